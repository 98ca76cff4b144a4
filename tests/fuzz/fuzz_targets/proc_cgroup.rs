//! `/proc/PID/cgroup` parsing: `tally_agent::cgroupfs::Cgroups` (procfs's
//! parser). The text comes from the kernel, but a process in a cgroup
//! namespace controls its cgroup *names* (any byte but `/` and NUL).
//!
//! The first line of the input is the v1 controller asked for. Invariants:
//! the v2 path is the rest of the first `0::` line (trailing space cut),
//! never spans lines; the v1 path is the third field of a line listing the
//! controller.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::cgroupfs::Cgroups;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (controller, text) = input.split_once('\n').unwrap_or(("memory", input));
    let Some(groups) = Cgroups::parse(text) else {
        return;
    };
    let unified = groups.unified();
    let expected = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end);
    assert_eq!(unified, expected);
    if let Some(path) = unified {
        assert!(!path.contains('\n'));
    }
    if let Some(path) = groups.v1(controller) {
        assert!(!path.contains('\n'));
        assert!(
            text.lines().any(|l| {
                let mut f = l.splitn(3, ':');
                let (_, c, p) = (f.next(), f.next(), f.next());
                p == Some(path) && c.is_some_and(|c| c.split(',').any(|c| c == controller))
            }),
            "{path:?} is not the path of a line listing {controller:?}"
        );
    }
});
