use iris_native::dedup::{dedup_key, DedupWindow};
use std::time::Instant;
fn main() {
    let ids: Vec<String> = (0..1_000_000).map(|i| format!("{i:032x}")).collect();
    let t = Instant::now();
    let keys: Vec<u128> = ids.iter().map(|m| dedup_key(b"alice", m.as_bytes()).unwrap()).collect();
    println!("key {:?}/op", t.elapsed() / 1_000_000);
    let mut w = DedupWindow::new(100_000, 60_000);
    let t = Instant::now();
    for k in &keys { w.check_and_insert(*k, 1000); }
    println!("check {:?}/op", t.elapsed() / 1_000_000);
}
