//! Arbitrary bytes, split at fuzzer-chosen points, into a repl-link decoder.
//! See `iris_native_fuzz::check_stream` for the properties checked.
#![no_main]

use iris_native::frame::LinkKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iris_native_fuzz::check_stream(LinkKind::Repl, data);
});
