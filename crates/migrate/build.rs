//! Embeds `migrations/catalog/*.sql` and `migrations/shard/*.sql` into the binary, so every
//! build carries exactly the schema it was written for. File names and phase headers are
//! checked here, so a malformed migration fails the build rather than a deploy.

use std::{env, fmt::Write as _, fs, path::Path};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
    let mut out = String::new();
    for (set, konst) in [("catalog", "CATALOG"), ("shard", "SHARD")] {
        let dir = root.join(set);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        let mut versions = std::collections::BTreeSet::new();
        writeln!(out, "pub(crate) static {konst}: &[(&str, &str)] = &[")
            .expect("writing to a String");
        for f in files {
            println!("cargo:rerun-if-changed={}", f.display());
            let name = f
                .file_name()
                .expect("read_dir entries have names")
                .to_string_lossy()
                .into_owned();
            let text =
                fs::read_to_string(&f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
            let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
            assert!(
                digits.len() == 4 && name[4..].starts_with('_'),
                "{set}/{name}: migration files are named NNNN_description.sql"
            );
            assert!(
                versions.insert(digits.clone()),
                "{set}/{name}: another migration already has number {digits}"
            );
            let first = text.lines().next().unwrap_or("");
            assert!(
                first == "-- phase: expand" || first == "-- phase: contract",
                "{set}/{name}: the first line must be `-- phase: expand` or `-- phase: contract`"
            );
            writeln!(
                out,
                "    ({name:?}, include_str!({:?})),",
                f.display().to_string()
            )
            .expect("writing to a String");
        }
        writeln!(out, "];").expect("writing to a String");
    }
    let dest = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("embedded.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}
