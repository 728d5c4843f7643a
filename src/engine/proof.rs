//! A point's files proven as they are read to leave this host (a sync, or
//! a backup's upload into a bucket): every byte is checked on its way out
//! against what the manifest records, so the bytes stored are the bytes
//! proven, and the file is read once.
//!
//! A file under a whole-file digest is hashed as it goes, and its object
//! made only if the digest is the manifest's. A file under a layout
//! digest has everything but its data proven first
//! ([`super::check::verify_but_data`]: a few reads), then each data
//! cluster checked against its cluster map as it goes. A layout this
//! cannot follow in one pass (compressed clusters, subclusters, a host
//! cluster two guest clusters share, an encrypted file) is read whole
//! against its map first, as `verify` reads it, its whole digest taken
//! before, and goes only if its bytes on the way still have that digest.

use anyhow::Context;

use super::check::{map_against_file, read_map};
use crate::cluster_map::{self, Map};
use crate::digest::Digest;
use crate::qcow2::{self, Image, Kind};
use crate::repo::{MapRecord, Repo, VolumeRecord};
use crate::s3::Proof;

/// How one file is proven on its way out.
pub(super) enum FileProof {
    /// BLAKE3 of every byte, fed in order, against the manifest's.
    Whole {
        hasher: Box<blake3::Hasher>,
        expected: Digest,
    },
    /// Each data cluster against the map, as it goes by.
    Clusters(Clusters),
    /// Proven by reading it whole before, and held to the bytes it
    /// had then: BLAKE3 of every byte, fed in order, against theirs.
    ReadBefore {
        hasher: Box<blake3::Hasher>,
        checked: Digest,
    },
}

/// A file's data clusters, by where they lie in it.
pub(super) struct Clusters {
    cs: u64,
    /// Host cluster -> guest cluster + 1 (0: no data cluster there).
    guest: Vec<u32>,
    map: Map,
    /// A data cluster that runs past the end of the bytes read so far.
    carry: Vec<u8>,
    /// Data clusters checked, and how many the file holds.
    checked: u64,
    data: u64,
}

impl FileProof {
    /// The proof of volume file `v` of a point of `repo` whose structure,
    /// layout and map were checked by [`super::check::verify_but_data`].
    pub(super) fn of_volume(repo: &Repo, v: &VolumeRecord) -> anyhow::Result<FileProof> {
        if !v.digest.is_layout() {
            return Ok(FileProof::whole(v.digest));
        }
        let record = v.cluster_map.as_ref().with_context(|| {
            format!(
                "{}: its digest leaves the data to a cluster map, and the manifest names none",
                v.file
            )
        })?;
        let path = repo.root().join(&v.file);
        let map = read_map(repo, record).with_context(|| record.file.clone())?;
        let image = Image::open(&path).with_context(|| format!("opening {}", v.file))?;
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", v.file))?;
        match Clusters::index(&file, &image, map)? {
            Ok(clusters) => Ok(FileProof::Clusters(clusters)),
            Err(map) => {
                // The bytes checked are the bytes that go: any change
                // after this digest (before the check, or after it)
                // stops the upload.
                let checked =
                    crate::digest::file(&path).with_context(|| format!("reading {}", v.file))?;
                map_against_file(&file, &image, &map)
                    .with_context(|| format!("{}: cluster map", v.file))?;
                Ok(FileProof::ReadBefore {
                    hasher: Box::new(blake3::Hasher::new()),
                    checked,
                })
            }
        }
    }

    /// The proof of a cluster map file.
    pub(super) fn of_map(record: &MapRecord) -> FileProof {
        FileProof::whole(record.digest)
    }

    fn whole(expected: Digest) -> FileProof {
        FileProof::Whole {
            hasher: Box::new(blake3::Hasher::new()),
            expected,
        }
    }
}

impl Clusters {
    /// Where each data cluster of `image` lies in `file`; the map back
    /// when the layout is not one this follows in one pass.
    fn index(
        file: &std::fs::File,
        image: &Image,
        map: Map,
    ) -> anyhow::Result<Result<Clusters, Map>> {
        let h = image.header();
        let cs = h.cluster_size();
        let len = file.metadata()?.len();
        if h.crypt_method != 0 || h.extended_l2() {
            return Ok(Err(map));
        }
        let mut guest = vec![0u32; len.div_ceil(cs) as usize];
        let mut data = 0u64;
        let mut followed = true;
        qcow2::walk(file, image, |e| {
            match (e.kind, e.offset) {
                (Kind::Data, Some(host)) if followed => {
                    let whole = e.start % cs == 0
                        && host % cs == 0
                        && (e.length % cs == 0 || e.start + e.length == h.size);
                    if !whole {
                        followed = false;
                        return Ok(());
                    }
                    for i in 0..e.length.div_ceil(cs) {
                        let c = e.start / cs + i;
                        let slot = guest.get_mut((host / cs + i) as usize);
                        match (slot, u32::try_from(c + 1)) {
                            (Some(slot), Ok(g)) if *slot == 0 => {
                                *slot = g;
                                data += 1;
                            }
                            _ => followed = false,
                        }
                    }
                }
                (Kind::Compressed, _) => followed = false,
                _ => {}
            }
            Ok(())
        })?;
        if !followed {
            return Ok(Err(map));
        }
        Ok(Ok(Clusters {
            cs,
            guest,
            map,
            carry: Vec::new(),
            checked: 0,
            data,
        }))
    }

    fn read(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        let cs = self.cs;
        let (mut at, mut rest) = (offset, bytes);
        while !rest.is_empty() {
            let host = at / cs;
            let within = (at % cs) as usize;
            let n = rest.len().min(cs as usize - within);
            let g = self.guest.get(host as usize).copied().unwrap_or(0);
            if g != 0 {
                let c = u64::from(g - 1);
                if within == 0 && n == cs as usize {
                    self.check(c, host, &rest[..n])?;
                } else {
                    if within == 0 {
                        self.carry.clear();
                    }
                    self.carry.extend_from_slice(&rest[..n]);
                    if self.carry.len() == cs as usize {
                        let carried = std::mem::take(&mut self.carry);
                        self.check(c, host, &carried)?;
                    }
                }
            }
            at += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Guest cluster `c`, stored at host cluster `host`: `bytes`.
    fn check(&mut self, c: u64, host: u64, bytes: &[u8]) -> Result<(), String> {
        let guest_len = self.map.cluster_len(c);
        match self.map.clusters.get(c) {
            Some(d) if *d == cluster_map::digest(&bytes[..guest_len]) => {
                self.checked += 1;
                Ok(())
            }
            Some(_) => Err(format!(
                "cluster {c} (at byte {} of the file): its digest is not the one the map records",
                host * self.cs
            )),
            None => Err(format!(
                "the map has no record of cluster {c}, which the file holds"
            )),
        }
    }
}

impl Proof for FileProof {
    fn read(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        match self {
            FileProof::Whole { hasher, .. } | FileProof::ReadBefore { hasher, .. } => {
                hasher.update(bytes);
                Ok(())
            }
            FileProof::Clusters(c) => c.read(offset, bytes),
        }
    }

    fn end(&mut self, len: u64) -> Result<(), String> {
        match self {
            FileProof::Whole { hasher, expected } => same(hasher, *expected, |digest| {
                format!("digest is {digest}, the manifest says {expected} ({len} bytes read)")
            }),
            FileProof::Clusters(c) if c.checked != c.data => Err(format!(
                "{} of its {} data clusters were read: the file ends at byte {len}, before its data",
                c.checked, c.data
            )),
            FileProof::ReadBefore { hasher, checked } => same(hasher, *checked, |digest| {
                format!(
                    "the file changed after it was checked against its cluster map (its digest was {checked}, is {digest}; {len} bytes read)"
                )
            }),
            FileProof::Clusters(_) => Ok(()),
        }
    }
}

/// Whether the bytes `hasher` was fed have digest `want`; `mismatch`
/// says why not, given theirs.
fn same(
    hasher: &blake3::Hasher,
    want: Digest,
    mismatch: impl FnOnce(Digest) -> String,
) -> Result<(), String> {
    let digest = Digest::Whole(hasher.finalize());
    match digest == want {
        true => Ok(()),
        false => Err(mismatch(digest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of 4 host clusters of 4 KiB: the header's, then guest
    /// clusters 2 and 5 (the disk's last, 1 KiB long), then a table's.
    fn file_and_proof() -> (Vec<u8>, Clusters) {
        let cs = 4096u64;
        let mut file = vec![0u8; 4 * cs as usize];
        for (i, b) in file.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let map = Map::from_records(
            cs,
            5 * cs + 1024,
            [
                (2, cluster_map::digest(&file[4096..2 * 4096])),
                (5, cluster_map::digest(&file[2 * 4096..2 * 4096 + 1024])),
            ],
        )
        .unwrap();
        let clusters = Clusters {
            cs,
            guest: vec![0, 3, 6, 0],
            map,
            carry: Vec::new(),
            checked: 0,
            data: 2,
        };
        (file, clusters)
    }

    fn feed(proof: &mut FileProof, file: &[u8], cuts: &[usize]) -> Result<(), String> {
        let mut at = 0;
        for &cut in cuts.iter().chain([file.len()].iter()) {
            proof.read(at as u64, &file[at..cut])?;
            at = cut;
        }
        proof.end(file.len() as u64)
    }

    #[test]
    fn clusters_are_checked_however_the_reads_cut_them() {
        for cuts in [&[][..], &[4096, 8192], &[100, 5000, 9000, 12_000], &[8191]] {
            let (file, clusters) = file_and_proof();
            let mut proof = FileProof::Clusters(clusters);
            assert_eq!(feed(&mut proof, &file, cuts), Ok(()), "{cuts:?}");
        }
    }

    #[test]
    fn a_changed_byte_of_data_or_a_short_file_is_caught() {
        let (mut file, clusters) = file_and_proof();
        // Past the guest length of the last cluster: not data, not checked.
        file[2 * 4096 + 2000] ^= 1;
        let mut proof = FileProof::Clusters(clusters);
        assert_eq!(feed(&mut proof, &file, &[5000]), Ok(()));

        let (mut file, clusters) = file_and_proof();
        file[6000] ^= 1;
        let mut proof = FileProof::Clusters(clusters);
        let e = feed(&mut proof, &file, &[5000]).unwrap_err();
        assert!(e.contains("cluster 2 (at byte 4096"), "{e}");

        let (file, clusters) = file_and_proof();
        let mut proof = FileProof::Clusters(clusters);
        let e = feed(&mut proof, &file[..8192], &[]).unwrap_err();
        assert!(e.contains("1 of its 2 data clusters"), "{e}");
    }

    #[test]
    fn a_whole_file_is_its_digest_or_refused() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let expected = Digest::Whole(blake3::hash(&bytes));
        let mut proof = FileProof::whole(expected);
        assert_eq!(feed(&mut proof, &bytes, &[1, 65_536]), Ok(()));
        let mut other = bytes.clone();
        other[99_999] ^= 1;
        let mut proof = FileProof::whole(expected);
        let e = feed(&mut proof, &other, &[]).unwrap_err();
        assert!(e.contains("the manifest says"), "{e}");
    }
}
