//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) and
//! the hand-written seeds through the same property functions the `cargo
//! fuzz` targets call (`backstop::fuzz`), on the stable toolchain: whatever
//! fuzzing found and fixed stays fixed in CI, without nightly.

use std::path::Path;

#[test]
fn every_corpus_file_and_seed_keeps_its_property() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut replayed = 0usize;
    for (name, property) in backstop::fuzz::TARGETS {
        for seed in backstop::fuzz::seeds(name) {
            property(&seed);
            replayed += 1;
        }
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
        let mut files = 0;
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("read corpus file");
            let result = std::panic::catch_unwind(|| property(&data));
            assert!(
                result.is_ok(),
                "fuzz target {name}: {} breaks its property",
                path.display()
            );
            files += 1;
        }
        assert!(files > 0, "corpus {} is empty", dir.display());
        replayed += files;
    }
    eprintln!("replayed {replayed} inputs");
}
