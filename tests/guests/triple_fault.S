# With the VMM's empty IDT, any exception becomes a triple fault: shutdown.
.code64
.global _start
_start:
  ud2
