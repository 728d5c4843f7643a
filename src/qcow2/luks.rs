//! The LUKS1 header a qcow2 image carries when encrypted with
//! `encrypt.format=luks`: read for reporting only. bitback never decrypts.

use serde::Serialize;

use super::error::{Error, Result};
use super::header::{be16, be32, ext};

pub const HEADER_LEN: usize = 592;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SECTOR: u64 = 512;

/// The fields `qemu-img info` shows under `encrypt`, with its names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksInfo {
    pub format: &'static str,
    pub cipher_alg: String,
    pub cipher_mode: String,
    pub ivgen_alg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<String>,
    pub hash_alg: String,
    pub detached_header: bool,
    pub payload_offset: u64,
    pub master_key_iters: u32,
    pub uuid: String,
    pub slots: Vec<LuksSlot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSlot {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
    pub key_offset: u64,
}

fn text(field: &[u8]) -> Result<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).map_err(|_| Error::NotUtf8 {
        what: "LUKS header text field",
    })
}

pub fn parse(buf: &[u8]) -> Result<LuksInfo> {
    let bad = |reason: &str| Error::BadExtension {
        kind: ext::CRYPTO,
        reason: reason.to_string(),
    };
    if buf.len() < HEADER_LEN {
        return Err(bad("LUKS header is truncated"));
    }
    if &buf[..6] != MAGIC {
        return Err(bad("no LUKS magic at the crypto header offset"));
    }
    if be16(buf, 6) != 1 {
        return Err(bad("LUKS version is not 1"));
    }
    let cipher_name = text(&buf[8..40])?;
    let cipher_mode_full = text(&buf[40..72])?;
    let hash_spec = text(&buf[72..104])?;
    let payload_sectors = be32(buf, 104);
    let key_bytes = be32(buf, 108);
    let mk_iterations = be32(buf, 164);
    let uuid = text(&buf[168..208])?;

    // "xts-plain64" or "cbc-essiv:sha256": mode, then the IV generator.
    let (mode, ivgen) = cipher_mode_full
        .split_once('-')
        .ok_or_else(|| bad("cipher mode has no IV generator"))?;
    let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
        Some((alg, hash)) => (alg.to_string(), Some(hash.to_string())),
        None => (ivgen.to_string(), None),
    };
    // XTS keys are two cipher keys. The key length comes from the file:
    // checked, it cannot wrap.
    let cipher_key_bits = u64::from(key_bytes) * if mode == "xts" { 4 } else { 8 };

    let slots = (0..8)
        .map(|i| {
            let s = 208 + i * 48;
            let active = be32(buf, s) == SLOT_ACTIVE;
            LuksSlot {
                active,
                iters: active.then(|| be32(buf, s + 4)),
                stripes: active.then(|| be32(buf, s + 44)),
                key_offset: u64::from(be32(buf, s + 40)) * SECTOR,
            }
        })
        .collect();
    Ok(LuksInfo {
        format: "luks",
        cipher_alg: format!("{cipher_name}-{cipher_key_bits}"),
        cipher_mode: mode.to_string(),
        ivgen_alg,
        ivgen_hash_alg: ivgen_hash,
        hash_alg: hash_spec,
        detached_header: false,
        payload_offset: u64::from(payload_sectors) * SECTOR,
        master_key_iters: mk_iterations,
        uuid,
        slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crafted key length overflowed `u32` (a panic in debug builds).
    #[test]
    fn huge_key_length_does_not_overflow() {
        let mut buf = vec![0u8; HEADER_LEN];
        buf[..6].copy_from_slice(MAGIC);
        buf[6..8].copy_from_slice(&1u16.to_be_bytes());
        buf[8..11].copy_from_slice(b"aes");
        buf[40..51].copy_from_slice(b"xts-plain64");
        buf[72..78].copy_from_slice(b"sha256");
        buf[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        let info = parse(&buf).expect("parses");
        assert_eq!(info.cipher_alg, format!("aes-{}", u64::from(u32::MAX) * 4));
        buf[40..51].copy_from_slice(b"cbc-plain64");
        assert_eq!(
            parse(&buf).expect("parses").cipher_alg,
            format!("aes-{}", u64::from(u32::MAX) * 8)
        );
    }
}
