fn main() {
    let (c, planted) = cella_policies::rules::bench::generate_corpus(50 << 20);
    std::fs::write("/tmp/corpus50.txt", &c).unwrap();
    let dir = std::path::Path::new("/tmp/corpus-files");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (i, ch) in c[..8 << 20].chunks(40_000).enumerate() { std::fs::write(dir.join(format!("f{i:04}.rs")), ch).unwrap(); }
    println!("planted {planted}");
}
