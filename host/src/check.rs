//! `clawq check <file.wasm>`: what a component imports and exports, which worlds (and so
//! which handler slots) accept it, and why the others do not.

use crate::crypto::sha256_hex;
use crate::runtime::{HANDLER_EXPORT, LEGACY_HANDLER_EXPORT, Limits, LoadError, Runtime};
use crate::world::World;

/// A report on `wasm`; with `world`, an error unless that world accepts it.
pub fn check(
    runtime: &Runtime,
    name: &str,
    wasm: &[u8],
    world: Option<World>,
) -> Result<String, LoadError> {
    let compiled = runtime.compile_component(name, wasm)?;
    let (imports, exports) = (&compiled.imports, &compiled.exports);
    let verdicts: Vec<(World, Result<(), String>)> = World::ALL
        .into_iter()
        .map(|w| {
            let handler = [HANDLER_EXPORT, LEGACY_HANDLER_EXPORT];
            let verdict = if exports.iter().any(|e| handler.contains(&e.as_str())) {
                w.check_imports(imports.iter().map(String::as_str))
            } else {
                Err(format!(
                    "does not export `{HANDLER_EXPORT}` (or `{LEGACY_HANDLER_EXPORT}`)"
                ))
            };
            (w, verdict)
        })
        .collect();
    if let Some(world) = world {
        runtime.load_compiled(name, wasm, &compiled, world, Limits::default())?;
    }
    let mut report = format!(
        "{name}: component, {} bytes, version {}\n",
        wasm.len(),
        &sha256_hex(wasm)[..12]
    );
    report += &format!("exports: {}\n", list(exports));
    report += &format!("imports: {}\n", list(imports));
    let accepted: Vec<&str> = verdicts
        .iter()
        .filter(|(_, v)| v.is_ok())
        .map(|(w, _)| w.name())
        .collect();
    match accepted.first() {
        Some(narrowest) => report += &format!("targets world: {narrowest}\n"),
        None => report += "targets world: none (no clawq handler slot accepts it)\n",
    }
    for (w, verdict) in &verdicts {
        match verdict {
            Ok(()) => report += &format!("  {:<18} accepts it\n", w.name()),
            Err(why) => report += &format!("  {:<18} refuses it: {why}\n", w.name()),
        }
    }
    Ok(report)
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
