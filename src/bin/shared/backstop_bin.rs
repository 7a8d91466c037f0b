//! Where the tools (`backstop-bench`, `backstop-sim`) find the server they
//! start: the path given on the command line, else the `backstop` binary
//! built beside the tool (cargo puts every binary of a profile together).
//! Included by path from each tool; not a binary of its own (no main.rs).

use std::path::PathBuf;

/// The `backstop` binary: the one given, else the one next to this tool.
pub fn backstop_bin(given: Option<&PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = me.with_file_name("backstop");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "no backstop binary next to {}; build it (cargo build --release) or pass --backstop-bin",
            me.display()
        ))
    }
}
