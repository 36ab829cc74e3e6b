# Waits for one byte on COM1 (polling the line status register), prints
# "echo: <byte>" and resets: proves host stdin reaches the guest's UART.
.code64
.global _start
_start:
  mov $0x3fd, %dx
1: in %dx, %al
  test $1, %al
  jz 1b
  mov $0x3f8, %dx
  in %dx, %al
  mov %al, %bl
  lea msg(%rip), %rsi
2: lodsb
  test %al, %al
  jz 3f
  out %al, %dx
  jmp 2b
3: mov %bl, %al
  out %al, %dx
  mov $10, %al
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
4: hlt
  jmp 4b
msg: .asciz "echo: "
