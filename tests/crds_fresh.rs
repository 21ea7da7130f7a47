//! `crds/` holds exactly what `r4 crds` prints; this fails when someone changes the types and
//! forgets `make crds`.

#[test]
fn crd_files_are_fresh() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let crds = r4::api::crds();
    assert_eq!(crds.len(), 3);
    for crd in crds {
        let name = r4::api::crd_file_name(&crd);
        let path = dir.join(&name);
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let generated = r4::api::crd_yaml(&crd).unwrap();
        assert!(on_disk == generated, "{name} is stale: run `make crds`");
    }
    let names: Vec<String> = r4::api::crds().iter().map(r4::api::crd_file_name).collect();
    assert_eq!(
        names,
        [
            "agentworkflows.r4.dev.yaml",
            "circuitpolicies.r4.dev.yaml",
            "chaosdrills.r4.dev.yaml"
        ]
    );
}

#[test]
fn crds_have_short_names_status_and_category() {
    for crd in r4::api::crds() {
        let v = &crd.spec.versions[0];
        assert_eq!(crd.spec.group, "r4.dev");
        assert_eq!(v.name, "v1alpha1");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["r4".to_string()][..])
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 3)
        );
    }
    let short: Vec<String> = r4::api::crds()
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap()[0].clone())
        .collect();
    assert_eq!(short, ["aw", "cp", "drill"]);
}
