//! The repository's Markdown, as the tests that check its snippets read it.

use std::path::{Path, PathBuf};

/// Every Markdown file of the repository (README, filters/, envoy/), recursively.
pub fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "md") {
                found.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = vec![root.join("README.md")];
    walk(&root.join("filters"), &mut found);
    walk(&root.join("envoy"), &mut found);
    found.sort();
    found
}

/// The fenced blocks of a document: info string, body.
pub fn fenced_blocks(text: &str) -> Vec<(&str, &str)> {
    text.split("```")
        .skip(1)
        .step_by(2)
        .map(|block| block.split_once('\n').unwrap_or((block, "")))
        .collect()
}
