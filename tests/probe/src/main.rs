//! `b2p-probe`: prints the path of the built probe bzImage, so a shell can
//! boot it: `b2p-vmm run --kernel "$(cargo run -q -p b2p-probe)"`.

fn main() {
    println!("{}", b2p_probe::BZIMAGE);
}
