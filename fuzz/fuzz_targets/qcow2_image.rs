//! Feeds arbitrary bytes to the qcow2 parser as a whole image: header,
//! extensions, bitmap directory, LUKS header, then the cluster map.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = bitback::qcow2::Image::parse(data, Path::new("/fuzz/image.qcow2")) else {
        return;
    };
    let _ = image.info();
    let _ = image.bitmap_status("bitback-1");
    let _ = bitback::qcow2::walk(data, &image, |_| Ok(()));
});
