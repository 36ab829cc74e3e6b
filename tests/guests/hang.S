# Neither prints nor resets: only --timeout ends it.
.code64
.global _start
_start:
  cli
1: hlt
  jmp 1b
