//! `r4 dev`: the operator's whole loop on one machine. A local Kubernetes API that kubectl
//! works against, and a local [`kubelet`] that plays the deployment controller and the kubelet
//! against it, running each pod's engine roles in process. Knows nothing of r4's kinds beyond
//! what CRDs register; the controller reaches all of it only through a kube `Client`.

pub mod kubelet;
