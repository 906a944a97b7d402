//! Architecture-specific boot state: what the guest's CPU and memory look like at its first
//! instruction.

pub mod x86_64;
