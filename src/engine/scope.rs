//! The names bitback gives things inside a QEMU, scoped to one repository
//! and one VM name, so runs for different repositories (a local and an
//! offsite copy) or different `--vm` names never touch each other's.
//!
//! - checkpoint bitmaps: `bitback-<repo id>-<vm>-<backup id>`; the backup
//!   id has a strict form (`20261126T152252Z` or `...Z-N`), which makes the
//!   name parse back unambiguously although VM names may hold `-`;
//! - target nodes and jobs: `bitback-<repo id>-<vm hash>-t<i>` / `-j<i>`,
//!   where the hash is 8 hex digits of BLAKE3 of the VM name: node names
//!   hold at most 31 bytes and only letters, digits and `-._`; the guard's
//!   nodes (see [`super::guard`]) end in `-c<i>` (its copy-before-write
//!   filter), `-a<i>` (the point's snapshot-access node) and `-f<i>` (the
//!   fleecing image), and a fleecing file is named as its node, plus
//!   `.qcow2`; `-m<i>` is the image that hands QEMU what a guarded full
//!   copies (for a moment, see [`super::guard::Guard::load_mask`]).
//!
//! Bitmaps named `bitback-<backup id>` were made by bitback before scoping;
//! a state that still names one as its checkpoint keeps using it once, and
//! the next backup replaces it with a scoped one.

use crate::repo::time::Utc;

const PREFIX: &str = "bitback-";

/// One repository's and one VM name's share of a QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub repo_id: String,
    pub vm: String,
}

/// Who a checkpoint bitmap belongs to, read from its name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    /// `None` for a bitmap from before scoped names.
    pub repo_id: Option<String>,
    pub vm: Option<String>,
    pub backup: String,
}

impl Scope {
    pub fn new(repo_id: &str, vm: &str) -> Scope {
        Scope {
            repo_id: repo_id.to_string(),
            vm: vm.to_string(),
        }
    }

    /// What every node and job name of this scope starts with.
    pub fn prefix(&self) -> String {
        self.short()
    }

    fn short(&self) -> String {
        let hash = blake3::hash(self.vm.as_bytes());
        format!("{PREFIX}{}-{}", self.repo_id, &hash.to_hex()[..8])
    }

    pub fn checkpoint(&self, backup: &str) -> String {
        format!("{PREFIX}{}-{}-{backup}", self.repo_id, self.vm)
    }

    pub fn target_node(&self, i: usize) -> String {
        format!("{}-t{i}", self.short())
    }

    pub fn job(&self, i: usize) -> String {
        format!("{}-j{i}", self.short())
    }

    /// Volume `i`'s copy-before-write filter.
    pub fn guard_filter(&self, i: usize) -> String {
        format!("{}-c{i}", self.short())
    }

    /// Volume `i`'s snapshot-access node (the point the job reads).
    pub fn guard_access(&self, i: usize) -> String {
        format!("{}-a{i}", self.short())
    }

    /// Volume `i`'s fleecing image node; the file is this plus `.qcow2`.
    pub fn fleece(&self, i: usize) -> String {
        format!("{}-f{i}", self.short())
    }

    /// Volume `i`'s mask image node, open for the moment its bitmap is
    /// merged.
    pub fn mask_node(&self, i: usize) -> String {
        format!("{}-m{i}", self.short())
    }

    /// Whether `file_name` is a fleecing image of this scope.
    pub fn owns_fleece_file(&self, file_name: &str) -> bool {
        file_name
            .strip_suffix(".qcow2")
            .and_then(|n| n.strip_prefix(&self.short()))
            .and_then(|rest| rest.strip_prefix("-f"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The id of the secret object that carries the backup key.
    pub fn secret(&self) -> String {
        format!("{}-k", self.short())
    }

    /// Whether `name` is a checkpoint bitmap of this scope.
    pub fn owns_checkpoint(&self, name: &str) -> bool {
        owner(name).is_some_and(|o| {
            o.repo_id.as_deref() == Some(&self.repo_id) && o.vm.as_deref() == Some(&self.vm)
        })
    }

    /// Whether `name` is a node (target, guard, fleecing, mask) or job id
    /// of this scope.
    pub fn owns_node_or_job(&self, name: &str) -> bool {
        name.strip_prefix(&self.short())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_prefix(['t', 'j', 'c', 'a', 'f', 'm']))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Whether `name` is a node a backup adds (a target, a guard's filter or
/// snapshot-access node, a fleecing image, a mask) of any scope, or a target of a
/// bitback from before scopes: never a volume.
pub fn is_target_node(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let digits = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    if rest.strip_prefix('t').is_some_and(digits) {
        return true;
    }
    rest.rsplit_once('-').is_some_and(|(_, last)| {
        last.strip_prefix(['t', 'c', 'a', 'f', 'm'])
            .is_some_and(digits)
    })
}

/// The owner of a bitmap bitback made, or `None` for any other name.
pub fn owner(name: &str) -> Option<Owner> {
    let rest = name.strip_prefix(PREFIX)?;
    if Utc::is_backup_id(rest) {
        return Some(Owner {
            repo_id: None,
            vm: None,
            backup: rest.to_string(),
        });
    }
    let (repo_id, rest) = rest.split_once('-')?;
    if repo_id.len() != crate::repo::REPO_ID_LEN || !repo_id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    // The backup id is the last 16 bytes, or the last 16 plus "-N".
    let split = rest
        .char_indices()
        .filter(|&(_, c)| c == '-')
        .map(|(i, _)| i)
        .find(|&i| Utc::is_backup_id(&rest[i + 1..]))?;
    let (vm, backup) = (&rest[..split], &rest[split + 1..]);
    crate::repo::check_name("VM", vm).ok()?;
    Some(Owner {
        repo_id: Some(repo_id.to_string()),
        vm: Some(vm.to_string()),
        backup: backup.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_scope() {
        let a = Scope::new("0123abcd", "web-1");
        let cp = a.checkpoint("20261126T145528Z");
        assert_eq!(cp, "bitback-0123abcd-web-1-20261126T145528Z");
        assert!(a.owns_checkpoint(&cp));
        assert!(a.owns_checkpoint(&a.checkpoint("20261126T145528Z-3")));
        let o = owner(&cp).unwrap();
        assert_eq!(o.vm.as_deref(), Some("web-1"));
        assert_eq!(o.backup, "20261126T145528Z");

        // Another VM name, another repository, a VM whose name ends like
        // a backup id: none is a's.
        for other in [
            Scope::new("0123abcd", "web"),
            Scope::new("0123abcd", "web-1-20261126T145528Z"),
            Scope::new("ffffffff", "web-1"),
        ] {
            let theirs = other.checkpoint("20261127T000000Z");
            assert!(!a.owns_checkpoint(&theirs), "{theirs}");
            assert!(other.owns_checkpoint(&theirs), "{theirs}");
            assert_eq!(
                owner(&theirs).unwrap().vm.as_deref(),
                Some(other.vm.as_str())
            );
            assert!(!a.owns_node_or_job(&other.target_node(0)));
            assert!(!a.owns_node_or_job(&other.job(0)));
        }
        assert!(!a.owns_checkpoint("bitback-20261126T145528Z"));
        assert_eq!(owner("bitback-20261126T145528Z").unwrap().vm, None);
        assert_eq!(owner("libvirt-backup"), None);
        assert_eq!(owner("bitback-0123abcd-web"), None);
    }

    #[test]
    fn node_names_fit_qemu() {
        let long = Scope::new("0123abcd", &"v".repeat(128));
        for name in [
            long.target_node(99),
            long.job(99),
            long.guard_filter(99),
            long.guard_access(99),
            long.fleece(99),
            long.mask_node(99),
        ] {
            assert!(name.len() <= 31, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            );
            assert!(long.owns_node_or_job(&name));
        }
        assert!(!long.owns_node_or_job(&format!("{}x", long.job(1))));
        for node in [
            long.target_node(1),
            long.guard_filter(1),
            long.guard_access(1),
            long.fleece(1),
            long.mask_node(1),
        ] {
            assert!(is_target_node(&node), "{node}");
        }
        assert!(!is_target_node(&long.job(1)));
        assert!(!is_target_node("bitback-notes"));
        assert!(long.owns_fleece_file(&format!("{}.qcow2", long.fleece(3))));
        assert!(!long.owns_fleece_file(&long.fleece(3)));
        assert!(
            !Scope::new("0123abcd", "w").owns_fleece_file(&format!("{}.qcow2", long.fleece(3)))
        );
    }
}
