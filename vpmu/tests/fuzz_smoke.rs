//! CI's bounded run of the fuzz targets (`vpmu/fuzz`, cargo-fuzz on
//! nightly) on stable: every input of the committed corpus, then random
//! inputs from a fixed seed. Not coverage-guided, but the same entry
//! functions and invariants (see `vpmu/fuzz/harness.rs`); a finding of the
//! real fuzzer is added to the corpus and stays a regression test here.

#[allow(dead_code)]
#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

/// Random inputs per target on top of the corpus.
const RANDOM_INPUTS: usize = 20_000;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    inputs
}

/// xorshift64*: deterministic inputs of varied lengths.
fn random_inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..count).map(move |_| {
        let len = (next() as usize) % max_len;
        (0..len).map(|_| next() as u8).collect()
    })
}

fn run(target: &str, entry: fn(&[u8]), max_len: usize) {
    let inputs = corpus(target);
    assert!(!inputs.is_empty(), "the {target} corpus is committed");
    for (name, data) in &inputs {
        let result = std::panic::catch_unwind(|| entry(data));
        assert!(result.is_ok(), "{target}: corpus input {name} fails");
    }
    for (n, data) in random_inputs(0x5EED_0000 + max_len as u64, RANDOM_INPUTS, max_len).enumerate()
    {
        let result = std::panic::catch_unwind(|| entry(&data));
        assert!(
            result.is_ok(),
            "{target}: random input {n} fails: {data:02x?}"
        );
    }
}

#[test]
fn msr_target_on_the_corpus_and_random_inputs() {
    run("msr", harness::msr, 2048);
}

#[test]
fn policy_target_on_the_corpus_and_random_inputs() {
    run("policy", harness::policy, 64);
}
