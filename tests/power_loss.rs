//! Durability under power loss, simulated without a VM: the host runs with
//! `support/fsync_snapshot.c` preloaded, which copies each database file aside whenever
//! it is synced. After a SIGKILL the test puts those copies back in place of the files
//! (deleting the files never synced), which is what the disk would hold after a power
//! loss that dropped every write not synced, and starts the host again on them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::support::*;

/// A plain queue, consumed by no handler: what is published there stays.
const AUDIT: &str = "audit";

/// The preloadable snapshotting library, built from its C source into `dir`.
fn build_shim(dir: &Path) -> PathBuf {
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/support/fsync_snapshot.c"
    );
    let library = dir.join("libfsync_snapshot.so");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(source)
        .args(["-ldl", "-lpthread"])
        .output()
        .expect("running cc");
    assert!(
        built.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    library
}

/// A host on `config` whose syncs are snapshotted into `snapshots`.
fn start_snapshotted(config: &str, shim: &Path, snapshots: &Path) -> Host {
    Host::start_env(
        config,
        &[
            ("LD_PRELOAD", shim.as_os_str()),
            ("SNAPSHOT_DIR", snapshots.as_os_str()),
            ("SNAPSHOT_WATCH", OsStr::new("/")),
        ],
    )
}

/// The names of the files synced so far, in order.
fn synced(snapshots: &Path) -> Vec<String> {
    std::fs::read_to_string(snapshots.join("log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Kills the host and leaves its databases as a power loss would: each file as it was at
/// its last sync, the files never synced gone; then starts it again, without the shim.
fn power_loss(host: &mut Host, snapshots: &Path) {
    host.kill();
    for entry in std::fs::read_dir(host.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".db-shm") {
            std::fs::remove_file(&path).unwrap();
        } else if name.ends_with(".db") || name.ends_with(".db-wal") {
            match std::fs::read(snapshots.join(&name)) {
                Ok(synced) => std::fs::write(&path, synced).unwrap(),
                Err(_) => std::fs::remove_file(&path).unwrap(),
            }
        }
    }
    host.restart();
}

fn with_audit_queue(config: &str) -> String {
    format!("{config}\n[[queues.producers]]\nqueue = \"{AUDIT}\"\n")
}

#[test]
fn a_revocation_is_never_lost_while_the_ack_after_it_survives_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let shim = build_shim(dir.path());
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir(&snapshots).unwrap();
    let mut host = start_snapshotted(
        &with_audit_queue(&fast_events_config("")),
        &shim,
        &snapshots,
    );

    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    wait_for("the revocation", || host.is_revoked(DID_A).then_some(()));
    host.wait_drained("clawdentity-events");

    // Enough published afterwards for SQLite to checkpoint (a WAL of 1000 pages): the
    // ack committed above is then on disk.
    let before = synced(&snapshots).len();
    let filler = "x".repeat(100 * 1024);
    for i in 0..60 {
        host.publish(AUDIT, json!({"filler": i, "pad": filler}));
    }
    wait_for("a checkpoint to sync the write-ahead log", || {
        synced(&snapshots)[before..]
            .iter()
            .any(|name| name.ends_with(".db-wal"))
            .then_some(())
    });

    power_loss(&mut host, &snapshots);
    let events = host.queue("clawdentity-events");
    // Either the revocation survived, or its event is back to be handled again: the
    // agent ends up revoked.
    wait_for("the agent to be revoked after the power loss", || {
        host.is_revoked(DID_A).then_some(())
    });
    eprintln!("after the power loss: events queue {events}");
}

#[test]
fn with_full_durability_every_acknowledged_publish_survives_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let shim = build_shim(dir.path());
    let published = 50;
    let mut survived = Vec::new();
    for durability in ["process", "full"] {
        let snapshots = dir.path().join(durability);
        std::fs::create_dir(&snapshots).unwrap();
        let config = with_audit_queue(&format!("durability = \"{durability}\"\n"));
        let mut host = start_snapshotted(&config, &shim, &snapshots);
        for i in 0..published {
            host.publish(AUDIT, json!({"n": i}));
        }
        power_loss(&mut host, &snapshots);
        survived.push(host.queue(AUDIT)["backlog"].as_u64().unwrap());
    }
    // The simulation does lose what was not synced: with `process`, commits since the
    // last checkpoint are gone (allowed: the README says an OS crash may take them).
    assert!(
        survived[0] < published,
        "with durability = \"process\" {} of {published} survived the simulated power loss",
        survived[0]
    );
    assert_eq!(
        survived[1], published,
        "with durability = \"full\" every publish answered 2xx survives"
    );
}
