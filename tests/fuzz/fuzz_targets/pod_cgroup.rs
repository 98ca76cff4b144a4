//! The cgroup-path → pod parser (`tally_agent::kubernetes::cgroup`), and the
//! kubelet log-directory and container log-link names it pairs with.
//!
//! Invariants: empty path components do not matter; a pod UID is 36
//! lower-case UUID characters or 32 hex digits and occurs in the path; a
//! container id is 64 lower-case hex digits with a runtime.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::kubernetes::cgroup::{parse, parse_container_log_link, parse_pod_log_dir};

fn is_uid(uid: &str) -> bool {
    let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    match uid.len() {
        36 => uid
            .char_indices()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { lower_hex(c) }),
        32 => uid.chars().all(lower_hex),
        _ => false,
    }
}

fn is_id(id: &str) -> bool {
    id.len() == 64 && id.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse(path);
    assert_eq!(
        parse(&path.replace('/', "//")),
        parsed,
        "empty components change the answer"
    );
    if let Some(p) = &parsed {
        assert!(is_uid(&p.pod_uid), "bad pod uid {:?}", p.pod_uid);
        let normalized = path.to_ascii_lowercase().replace('_', "-");
        assert!(normalized.contains(&p.pod_uid), "uid not in the path");
        assert_eq!(p.container_id.is_some(), p.runtime.is_some());
        if let Some(id) = &p.container_id {
            assert!(is_id(id), "bad container id {id:?}");
        }
    }
    if let Some((ns, pod, uid)) = parse_pod_log_dir(path) {
        assert!(is_uid(&uid) && !ns.is_empty() && !pod.is_empty());
        assert!(!ns.contains('_') && !pod.contains('_'));
    }
    if let Some((pod, ns, container, id)) = parse_container_log_link(path) {
        assert!(is_id(&id));
        assert!(!pod.is_empty() && !ns.is_empty() && !container.is_empty());
    }
});
