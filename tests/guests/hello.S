# Prints a line on COM1 and resets through the i8042: exit code 0.
.code64
.global _start
_start:
  mov $0x3f8, %dx
  lea msg(%rip), %rsi
1: lodsb
  test %al, %al
  jz 2f
  out %al, %dx
  jmp 1b
2: mov $0xfe, %al
  out %al, $0x64
3: hlt
  jmp 3b
msg: .asciz "hello: long mode entry works\n"
