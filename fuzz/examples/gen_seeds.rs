//! Write the seed corpus: `gen_seeds DIR` creates `DIR/TARGET/NAME` for
//! every seed in `nbdcp_fuzz::seeds`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let mut n = 0;
    for (target, name, data) in nbdcp_fuzz::seeds::all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(format!("seed_{name}")), data)?;
        n += 1;
    }
    println!("wrote {n} seeds under {}", dir.display());
    Ok(())
}
