# Spins in one named function for ever, interrupts off: a kernel whose
# symbol table says where every profile sample lands. Only --timeout or a
# signal ends it.
.code64
.global _start
.type _start, @function
_start:
  cli
  xor %ebp, %ebp
  call hot_loop
.size _start, .-_start

.global hot_loop
.type hot_loop, @function
hot_loop:
  inc %rax
  jmp hot_loop
.size hot_loop, .-hot_loop
