//! The documentation cannot drift from the code: every TOML block of the README and of
//! `docs/` (and the examples' READMEs) is a config the host's own loader accepts.

use std::path::Path;

/// The fenced ```toml blocks of `markdown`.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.trim_start() == "```toml" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(block.join("\n"));
        }
    }
    blocks
}

#[test]
fn every_toml_block_of_the_docs_is_a_config_the_host_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let files = [
        "README.md",
        "docs/writing-a-handler.md",
        "docs/protocol.md",
        "components/examples/dead-letter-digest/README.md",
        "components/examples/js-handler/README.md",
    ];
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (i, block) in toml_blocks(&text).iter().enumerate() {
            if let Err(err) = clawq::config::Config::parse(block) {
                panic!("{file}, TOML block {}: {err:#}\n{block}", i + 1);
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} TOML blocks found");
}
