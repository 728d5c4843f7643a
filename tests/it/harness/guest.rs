//! The sequence-log guest (fixtures/guest): checking a restored disk's
//! log, a point's two disks, and what the guest's serial console says of
//! its agent.

use std::path::Path;

use super::bitback;

/// Slots in the guest's log (init.sh's N), 4 KiB each.
pub(crate) const SLOTS: u64 = 64;

pub(crate) fn checksum(k: u64) -> u64 {
    (k * 2_654_435_761 + 12_345) % (1 << 32)
}

/// The last record K of a consistent log on a raw disk image, `None` for a
/// disk never written; an error describing the first inconsistency.
pub(crate) fn check_log(image: &Path) -> Result<Option<u64>, String> {
    let bytes = std::fs::read(image).map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    for slot in 0..SLOTS {
        let block = &bytes[(slot * 4096) as usize..((slot + 1) * 4096) as usize];
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let text =
            std::str::from_utf8(&block[..30]).map_err(|_| format!("slot {slot}: not text"))?;
        let fields: Vec<&str> = text.split_whitespace().collect();
        let (k, c) = match fields.as_slice() {
            ["BBREC", k, c, ..] => (
                k.parse::<u64>()
                    .map_err(|_| format!("slot {slot}: bad k {text:?}"))?,
                c.parse::<u64>()
                    .map_err(|_| format!("slot {slot}: bad checksum {text:?}"))?,
            ),
            _ => return Err(format!("slot {slot}: not a record: {text:?}")),
        };
        if c != checksum(k) {
            return Err(format!("slot {slot}: record {k} has a bad checksum"));
        }
        if k % SLOTS != slot {
            return Err(format!("record {k} is in slot {slot}"));
        }
        records.push(k);
    }
    let Some(&last) = records.iter().max() else {
        return Ok(None);
    };
    // One unbroken run ending at `last`: the newest SLOTS records.
    let first = last.saturating_sub(SLOTS - 1);
    let mut expected: Vec<u64> = (first..=last).collect();
    records.sort_unstable();
    expected.sort_unstable();
    if records != expected {
        return Err(format!(
            "records {:?} are not the run {first}..={last}",
            records
        ));
    }
    Ok(Some(last))
}

/// Restores every volume of backup `id` of VM `vm`, whose two disks (the
/// first written first) are the volumes `names`, and checks both logs;
/// returns the last record on each (-1 for a disk not written yet).
pub(crate) fn check_point_of(
    repo: &Path,
    vm: &str,
    id: &str,
    names: [&str; 2],
    out: &Path,
) -> (i64, i64) {
    let run = bitback(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        vm,
        "--backup",
        id,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let [a, b] = names;
    let a = check_log(&out.join(format!("{a}.raw"))).unwrap_or_else(|e| panic!("{id} {a}: {e}"));
    let b = check_log(&out.join(format!("{b}.raw"))).unwrap_or_else(|e| panic!("{id} {b}: {e}"));
    std::fs::remove_dir_all(out).unwrap();
    let last = |k: Option<u64>| k.map_or(-1, |k| k as i64);
    let (a, b) = (last(a), last(b));
    // vda is written first: it may be one record ahead.
    assert!(a == b || a == b + 1, "{id}: disk0 at {a}, disk1 at {b}");
    (a, b)
}

/// How many times the guest whose serial log is in `dir` logged `event`
/// ("frozen", "thawed").
pub(crate) fn serial_count(dir: &Path, event: &str) -> usize {
    let text = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.trim() == format!("bitback-guest: {event}"))
        .count()
}

/// A bitback SIGKILLed while the guest was frozen, whose thaw guard then
/// thawed the guest.
pub(crate) fn assert_killed_and_thawed(killed: &super::Run) {
    assert_eq!(killed.code, None, "killed by a signal: {}", killed.stderr);
    assert!(
        killed.stderr.contains("guest thawed after bitback ended"),
        "{}",
        killed.stderr
    );
}
