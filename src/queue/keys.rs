//! Redis key naming for r4, in one place.
//!
//! Every key of a workflow carries the Redis Cluster hash tag
//! `{<namespace>/<workflow>}`, so all keys a workflow touches (streams, DLQ,
//! inbox markers, idempotency keys, status hashes, ...) hash to the same slot.
//! That is what lets the atomic Lua scripts in [`crate::queue::redis`] touch
//! several of them in one call on a cluster. [`key_slot`] implements the
//! Redis Cluster CRC16 keyslot so tests can check this.
//!
//! Nothing outside this file builds a key name. After the prefix, every key
//! starts with its kind's own segment (`stream:`, `inbox:`, `breaker:`, …), and
//! a caller-supplied name (agent, tool, stream, task id) only ever comes after
//! that segment, so no name — not `dlq`, not `stream:x`, not `a:b` — can make
//! one kind's key equal another's (tested below). Pub/sub channels
//! (`…:chan`) live in Redis' channel namespace, apart from keys.

/// Key builder for one workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys for `namespace/workflow`. Braces and slashes in either part are
    /// replaced by `_` so they cannot break the hash tag or make two
    /// workflows share one (`a/b` + `c` vs `a` + `b/c`).
    pub fn new(namespace: &str, workflow: &str) -> Self {
        let clean = |s: &str| s.replace(['{', '}', '/'], "_");
        Self {
            prefix: format!("r4:{{{}/{}}}", clean(namespace), clean(workflow)),
        }
    }

    /// What every key of every workflow of `namespace` starts with,
    /// `r4:{ns/` (to find or remove them all, e.g. after a bench).
    pub fn namespace_prefix(namespace: &str) -> String {
        format!("r4:{{{}/", namespace.replace(['{', '}', '/'], "_"))
    }

    /// `r4:{ns/wf}` — every key of the workflow starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash tag content, `ns/wf`.
    pub fn hash_tag(&self) -> &str {
        let start = self.prefix.find('{').map_or(0, |i| i + 1);
        let end = self.prefix.rfind('}').unwrap_or(self.prefix.len());
        &self.prefix[start..end]
    }

    /// A work stream, e.g. the input stream of an agent: `r4:{ns/wf}:stream:<name>`.
    pub fn stream(&self, name: &str) -> String {
        format!("{}:stream:{name}", self.prefix)
    }

    /// Audit stream of tool calls (opt-in, capped; [`crate::telemetry::audit`]):
    /// `r4:{ns/wf}:audit`.
    pub fn audit(&self) -> String {
        format!("{}:audit", self.prefix)
    }

    /// Dead-letter stream: `r4:{ns/wf}:dlq`.
    pub fn dlq(&self) -> String {
        format!("{}:dlq", self.prefix)
    }

    /// Replay schedule of the DLQ: a sorted set of DLQ record ids scored by
    /// the time (ms) each is due for the repair role: `r4:{ns/wf}:dlq:due`.
    pub fn dlq_due(&self) -> String {
        format!("{}:dlq:due", self.prefix)
    }

    /// Poison stream (entries that cannot even be parsed): `r4:{ns/wf}:poison`.
    pub fn poison(&self) -> String {
        format!("{}:poison", self.prefix)
    }

    /// Inbox marker proving that `step` of `task_id` completed:
    /// `r4:{ns/wf}:inbox:<task-id>:<step>`.
    pub fn inbox(&self, task_id: &str, step: &str) -> String {
        format!("{}:inbox:{task_id}:{step}", self.prefix)
    }

    /// Idempotent-intake key: `r4:{ns/wf}:idem:<intake-key>`.
    pub fn idem(&self, intake_key: &str) -> String {
        format!("{}:idem:{intake_key}", self.prefix)
    }

    /// Task status hash: `r4:{ns/wf}:task:<id>`.
    pub fn task(&self, id: &str) -> String {
        format!("{}:task:{id}", self.prefix)
    }

    /// Kill-switch flag key: `r4:{ns/wf}:killswitch`.
    pub fn killswitch(&self) -> String {
        format!("{}:killswitch", self.prefix)
    }

    /// Pub/sub channel announcing kill-switch changes: `r4:{ns/wf}:killswitch:chan`.
    pub fn killswitch_channel(&self) -> String {
        format!("{}:killswitch:chan", self.prefix)
    }

    /// Per-engine stats: `r4:{ns/wf}:stats:<engine-id>`.
    pub fn stats(&self, engine_id: &str) -> String {
        format!("{}:stats:{engine_id}", self.prefix)
    }

    /// Prefix to scan for all engines' stats: `r4:{ns/wf}:stats:`.
    pub fn stats_prefix(&self) -> String {
        format!("{}:stats:", self.prefix)
    }

    /// One injected fault (a JSON record with a TTL; see `engine::faults`):
    /// `r4:{ns/wf}:fault:<drill>:<index>`.
    pub fn fault(&self, drill: &str, index: usize) -> String {
        format!("{}:fault:{drill}:{index}", self.prefix)
    }

    /// Prefix of every fault key of one drill: `r4:{ns/wf}:fault:<drill>:`.
    pub fn fault_prefix(&self, drill: &str) -> String {
        format!("{}:fault:{drill}:", self.prefix)
    }

    /// Index of the injected faults (sorted set, score = end in unix ms):
    /// `r4:{ns/wf}:faults`.
    pub fn faults(&self) -> String {
        format!("{}:faults", self.prefix)
    }

    /// Announces a change of the injected faults: `r4:{ns/wf}:faults:changed`.
    pub fn faults_channel(&self) -> String {
        format!("{}:faults:changed", self.prefix)
    }

    /// Agent checkpoint: `r4:{ns/wf}:checkpoint:<agent>`.
    pub fn checkpoint(&self, agent: &str) -> String {
        format!("{}:checkpoint:{agent}", self.prefix)
    }

    /// Attempt history of one input entry of an agent, kept while it is
    /// retried (a JSON list; written only on failures):
    /// `r4:{ns/wf}:attempts:<agent>:<entry-id>`.
    pub fn attempts(&self, agent: &str, entry_id: &str) -> String {
        format!("{}:attempts:{agent}:{entry_id}", self.prefix)
    }

    /// Completed compensable saga steps of one task (a stream, appended in
    /// the same atomic step as the step's completion): `r4:{ns/wf}:saga:<task-id>`.
    pub fn saga(&self, task_id: &str) -> String {
        format!("{}:saga:{task_id}", self.prefix)
    }

    /// The parts of one task's join at a joining agent (a hash: `p:<stream>`
    /// → the branch's output, `joined`, `failed:<step>`, `nfailed`):
    /// `r4:{ns/wf}:join:<agent>:<task-id>` (agent names hold no `:`).
    pub fn join(&self, agent: &str, task_id: &str) -> String {
        format!("{}:join:{agent}:{task_id}", self.prefix)
    }

    /// Open joins of a joining agent by deadline (a sorted set of task ids
    /// scored by the wall-clock ms their join times out):
    /// `r4:{ns/wf}:join-due:<agent>`.
    pub fn join_due(&self, agent: &str) -> String {
        format!("{}:join-due:{agent}", self.prefix)
    }

    /// Dead-letter marker of a task (for the intake's status answer):
    /// `r4:{ns/wf}:task-dlq:<id>`. (Not `task:<id>:dlq`: task ids may hold
    /// `:`, and `task:` + `x:dlq` would be this key of task `x`.)
    pub fn task_dlq(&self, id: &str) -> String {
        format!("{}:task-dlq:{id}", self.prefix)
    }

    /// Published circuit-breaker states, one hash field per tool:
    /// `r4:{ns/wf}:breakers`.
    pub fn breakers(&self) -> String {
        format!("{}:breakers", self.prefix)
    }

    /// Kill-switch acknowledgements, one hash field per engine:
    /// `r4:{ns/wf}:killswitch:acks`.
    pub fn killswitch_acks(&self) -> String {
        format!("{}:killswitch:acks", self.prefix)
    }

    /// Kill-switch state version counter: `r4:{ns/wf}:killswitch:version`.
    pub fn killswitch_version(&self) -> String {
        format!("{}:killswitch:version", self.prefix)
    }

    /// Degraded-mode marker of an agent: `r4:{ns/wf}:degraded:<agent>`.
    pub fn degraded(&self, agent: &str) -> String {
        format!("{}:degraded:{agent}", self.prefix)
    }

    /// Pub/sub channel of one engine of an agent for agent-level hedging notes (a peer's
    /// request to shadow a delivery, "done" notes): `r4:{ns/wf}:hedge:<agent>:<engine>`.
    pub fn hedge_channel(&self, agent: &str, engine_id: &str) -> String {
        format!("{}:hedge:{agent}:{engine_id}", self.prefix)
    }

    /// The engines of an agent that take hedged deliveries (a hash: engine id → the ms
    /// timestamp it last said so): `r4:{ns/wf}:hedge:<agent>:peers`.
    pub fn hedge_peers(&self, agent: &str) -> String {
        format!("{}:hedge:{agent}:peers", self.prefix)
    }

    /// Pub/sub channel announcing degraded-mode changes: `r4:{ns/wf}:degraded:chan`.
    pub fn degraded_channel(&self) -> String {
        format!("{}:degraded:chan", self.prefix)
    }

    /// A tool's shared circuit-breaker opening (a string with a TTL of the
    /// open duration, see `resilience::shared_breaker`): `r4:{ns/wf}:breaker:<tool>`.
    pub fn breaker(&self, tool: &str) -> String {
        format!("{}:breaker:{tool}", self.prefix)
    }

    /// Pub/sub channel announcing shared breaker openings: `r4:{ns/wf}:breaker:chan`.
    pub fn breaker_channel(&self) -> String {
        format!("{}:breaker:chan", self.prefix)
    }

    /// The CircuitPolicies the workflow's engines run, as the controller published them
    /// (hash: `policies` JSON and `version`, see `engine::policies`): `r4:{ns/wf}:policies`.
    pub fn policies(&self) -> String {
        format!("{}:policies", self.prefix)
    }

    /// Version counter of the published policies: `r4:{ns/wf}:policies:version`.
    pub fn policies_version(&self) -> String {
        format!("{}:policies:version", self.prefix)
    }

    /// Pub/sub channel announcing a new policy version: `r4:{ns/wf}:policies:chan`.
    pub fn policies_channel(&self) -> String {
        format!("{}:policies:chan", self.prefix)
    }

    /// The names the workflow's engines run (agents and tools, written by
    /// every engine on start), which `r4 kill` checks targets against:
    /// `r4:{ns/wf}:topology`.
    pub fn topology(&self) -> String {
        format!("{}:topology", self.prefix)
    }
}

/// Redis Cluster keyslot (CRC16/XMODEM mod 16384), honouring `{hash tags}`
/// exactly as Redis does: the first `{` followed later by a `}` with at least
/// one byte between them.
pub fn key_slot(key: &[u8]) -> u16 {
    let mut hashed = key;
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        hashed = &key[open + 1..open + 1 + len];
    }
    crc16(hashed) % 16384
}

/// CRC16-CCITT (XMODEM), the variant Redis Cluster uses.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn crc16_matches_redis_reference() {
        // Reference values from the Redis Cluster spec / CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Empty tag: whole key is hashed. Values below were taken from a real
        // `redis-server --cluster-enabled yes` via CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo{}{bar}"), 8363);
        assert_eq!(key_slot(b"r4:{team-a/review-flow}:dlq"), 16301);
        assert_eq!(key_slot(b"n_s/w_f"), 11144);
    }

    #[test]
    fn all_keys_of_a_workflow_share_a_slot() {
        let k = Keys::new("team-a", "review-flow");
        assert_eq!(k.hash_tag(), "team-a/review-flow");
        let keys = [
            k.stream("planner"),
            k.stream("coder"),
            k.dlq(),
            k.dlq_due(),
            k.poison(),
            k.inbox("task-1", "coder"),
            k.idem("intake-42"),
            k.task("task-1"),
            k.killswitch(),
            k.killswitch_channel(),
            k.stats("engine-0"),
            k.stats_prefix(),
            k.fault("drop-acks", 0),
            k.faults(),
            k.faults_channel(),
            k.checkpoint("planner"),
            k.attempts("coder", "1-0"),
            k.saga("task-1"),
            k.task_dlq("task-1"),
            k.breakers(),
            k.killswitch_acks(),
            k.killswitch_version(),
            k.degraded("coder"),
            k.degraded_channel(),
            k.breaker("bank"),
            k.breaker_channel(),
            k.topology(),
            k.policies(),
            k.policies_version(),
            k.policies_channel(),
        ];
        let slot = key_slot(b"team-a/review-flow");
        for key in &keys {
            assert!(key.starts_with("r4:{team-a/review-flow}:"), "{key}");
            assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
        }
        assert_eq!(k.stream("x"), "r4:{team-a/review-flow}:stream:x");
        assert!(k.prefix().starts_with(&Keys::namespace_prefix("team-a")));
        assert!(!k.prefix().starts_with(&Keys::namespace_prefix("team")));
        assert_eq!(k.inbox("t", "s"), "r4:{team-a/review-flow}:inbox:t:s");
        // Different workflows usually land elsewhere; at least the tag differs.
        let other = Keys::new("team-a", "other");
        assert_ne!(other.dlq(), k.dlq());
    }

    /// Every key kind, fed `n` (and `m` where it takes two names).
    fn every_key(k: &Keys, n: &str, m: &str) -> Vec<(&'static str, String)> {
        vec![
            ("stream", k.stream(n)),
            ("dlq", k.dlq()),
            ("poison", k.poison()),
            ("inbox", k.inbox(n, m)),
            ("idem", k.idem(n)),
            ("task", k.task(n)),
            ("killswitch", k.killswitch()),
            ("stats", k.stats(n)),
            ("fault", k.fault(n, 0)),
            ("checkpoint", k.checkpoint(n)),
            ("attempts", k.attempts(n, m)),
            ("saga", k.saga(n)),
            ("task_dlq", k.task_dlq(n)),
            ("breakers", k.breakers()),
            ("killswitch_acks", k.killswitch_acks()),
            ("killswitch_version", k.killswitch_version()),
            ("degraded", k.degraded(n)),
            ("breaker", k.breaker(n)),
            ("topology", k.topology()),
            ("policies", k.policies()),
            ("policies_version", k.policies_version()),
            ("policies_channel", k.policies_channel()),
        ]
    }

    #[test]
    fn no_two_kinds_collide_for_any_name() {
        // Names a user may pick (tools, agents, streams are DNS labels; task ids and
        // idempotency keys may hold ':' and '.'), chosen to hit other kinds' segments.
        let names = [
            "",
            "x",
            "dlq",
            "poison",
            "killswitch",
            "acks",
            "version",
            "chan",
            "breakers",
            "breaker",
            "topology",
            "policies",
            "policies:version",
            "task",
            "dlq:x",
            "stream:x",
            "a:b",
            "x:dlq",
            ":",
            "a:b:c",
            "1-0",
            "killswitch:acks",
            "task-dlq",
            "inbox",
            "stats:e",
            "*",
            "{x}",
        ];
        let k = Keys::new("ns", "wf");
        let mut owner: BTreeMap<String, &'static str> = BTreeMap::new();
        for n in names {
            for m in names {
                for (kind, key) in every_key(&k, n, m) {
                    if let Some(other) = owner.insert(key.clone(), kind) {
                        assert_eq!(other, kind, "{key:?} is both a {other} and a {kind} key");
                    }
                }
            }
        }
        // The rule behind it: a fixed kind segment right after the prefix; a name only after
        // it; the segments of kinds without a name are no named kind's segment.
        let named = [
            "stream",
            "inbox",
            "idem",
            "task",
            "stats",
            "fault",
            "checkpoint",
            "attempts",
            "saga",
            "task-dlq",
            "degraded",
            "breaker",
        ];
        for (kind, key) in every_key(&k, "NAME", "OTHER") {
            let rest = key
                .strip_prefix("r4:{ns/wf}:")
                .unwrap_or_else(|| panic!("{kind}: {key}"));
            match rest.split_once(':') {
                Some((seg, name)) if named.contains(&seg) => {
                    assert!(
                        name.starts_with("NAME"),
                        "{kind}: the name comes first after {seg:?}: {key}"
                    )
                }
                _ => {
                    assert!(
                        !rest.contains("NAME"),
                        "{kind}: a name outside a named kind: {key}"
                    );
                    let seg = rest.split(':').next().unwrap_or("");
                    assert!(
                        !named.contains(&seg),
                        "{kind}: {seg:?} is a named kind's segment"
                    );
                }
            }
        }
    }

    #[test]
    fn workflows_cannot_share_a_tag() {
        assert_ne!(
            Keys::new("a/b", "c").prefix(),
            Keys::new("a", "b/c").prefix()
        );
        assert_ne!(Keys::new("a", "b").dlq(), Keys::new("a", "b:dlq").dlq());
    }

    #[test]
    fn braces_in_names_cannot_break_the_tag() {
        let k = Keys::new("n{s", "w}f");
        assert_eq!(k.prefix(), "r4:{n_s/w_f}");
        assert_eq!(key_slot(k.dlq().as_bytes()), key_slot(b"n_s/w_f"));
    }
}
