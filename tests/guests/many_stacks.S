# A hostile guest for the profiler: every sample finds a kernel stack it
# has never seen, 64 frames deep. RBP heads a chain of 80 frames in memory
# whose first return address counts up without end, so a profile would
# keep one new deep stack per sample. Only --timeout or a signal ends it.
.code64
.global _start
_start:
  cli
  mov $0x400000, %rdi
  mov %rdi, %rbx
  mov $80, %ecx
1:
  lea 16(%rbx), %rax
  mov %rax, (%rbx)          # the caller's frame
  movq $0x200100, 8(%rbx)   # its return address
  add $16, %rbx
  loop 1b
  mov %rdi, %rbp
  mov $1, %rax
2:
  inc %rax
  mov %rax, 8(%rbp)         # the first return address: new every time
  jmp 2b
