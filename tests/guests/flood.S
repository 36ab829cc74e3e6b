# Writes lines to COM1 forever, as fast as port I/O exits go: a console
# that nobody reads fills up. Only --timeout or a signal ends it.
.code64
.global _start
_start:
  mov $0x3f8, %dx
1: lea msg(%rip), %rsi
2: lodsb
  test %al, %al
  jz 1b
  out %al, %dx
  jmp 2b
msg: .asciz "flood: the guest writes to COM1 and nobody reads the host side\n"
