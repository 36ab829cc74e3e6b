# Resets the machine through the i8042 with its first instruction: under
# --on-reset reboot, a reboot loop as fast as the VMM can build boots.
.code64
.global _start
_start:
  mov $0xfe, %al
  out %al, $0x64
1: hlt
  jmp 1b
