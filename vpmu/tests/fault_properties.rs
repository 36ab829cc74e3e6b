//! Property tests over the fuzz harness's scenarios (`vpmu/fuzz/harness.rs`):
//! either vendor, any model the input describes, host refusals of every
//! kind, host events lost behind the vPMU's back, corrupted contexts, tiny
//! and huge clocks. Every invariant of the harness is checked after every
//! step (values within width, status bits explained by overflows,
//! generations moving exactly with the programming, no panic and no
//! overflow: overflow checks are on for `vpmu`), and at the end the
//! counters recover once the host allows events again. proptest shrinks a
//! failing scenario to a minimal input and keeps it in
//! `fault_properties.proptest-regressions`.

#[allow(dead_code)]
#[path = "../fuzz/harness.rs"]
mod harness;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn any_guest_on_any_host_keeps_the_invariants(
        data in proptest::collection::vec(any::<u8>(), 0..1536)
    ) {
        harness::msr(&data);
    }

    #[test]
    fn any_policy_text_parses_back_or_is_refused(text in ".{0,40}") {
        harness::policy(text.as_bytes());
    }
}
