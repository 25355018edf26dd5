//! Embeds the default ViewDefinitions from `schemas/` into the binary, so flatfhir works from
//! any directory without a schemas folder next to it.
use std::{env, fs, path::Path};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = embed(
        &root.join("schemas"),
        ".json",
        "DEFAULT_VIEWS",
        "Default views",
        "include_str",
    );
    out.push_str(&embed(
        &root.join("tests/data/sample"),
        ".ndjson.gz",
        "SAMPLE_FILES",
        "The bundled sample export (gzip ndjson)",
        "include_bytes",
    ));
    let dest = Path::new(&env::var("OUT_DIR").unwrap()).join("embedded.rs");
    fs::write(dest, out).unwrap();
}

fn embed(dir: &Path, suffix: &str, name: &str, doc: &str, how: &str) -> String {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<_> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let ty = if how == "include_str" {
        "&str"
    } else {
        "&[u8]"
    };
    let mut out =
        format!("/// {doc}: (file name, contents).\npub static {name}: &[(&str, {ty})] = &[\n");
    for p in names {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        out.push_str(&format!(
            "    ({name:?}, {how}!({:?})),\n",
            p.display().to_string()
        ));
    }
    out.push_str("];\n");
    out
}
