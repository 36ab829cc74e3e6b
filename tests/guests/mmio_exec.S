# Jumps into the MMIO gap, where no memory is: KVM cannot fetch or emulate
# the instruction and stops with an internal error.
.code64
.global _start
_start:
  mov $0xd0000000, %rax
  jmp *%rax
