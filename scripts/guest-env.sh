# Sourced by build-guest.sh and test.sh: the Rust flags that make cella-runner a freestanding
# guest image (see build-guest.sh for why the Linux code generator is used). Sharing one
# definition keeps clippy's and the build's caches valid.
guest_flags=(
  --cfg cella_guest
  -C relocation-model=static
  -C target-cpu=x86-64-v2
  -C panic=abort
  -C link-arg=-nostartfiles
  -C link-arg=-nostdlib
  -C link-arg=-static
  -C link-arg=-no-pie
  -C link-arg=-Wl,--image-base=0x200000
  -C link-arg=-Wl,--build-id=none
  -C link-arg=-Wl,-z,noexecstack
)
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="${guest_flags[*]}"
