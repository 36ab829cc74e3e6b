# A hostile user of the ACPI MP wakeup mailbox (run with --vcpus 2): an
# unknown APIC ID, a reserved command, odd-sized writes, one good wakeup of
# AP 1, a repeated wakeup of it. Prints what the command field reads back
# after each, how often the AP entered, and what the firmware half reads:
#   "mailbox: unknown=1 reserved=5 woke=0 repeat=1 entries=1 fw=0"
# then resets. The AP's entry runs with no stack: it counts and halts.
.code64
.global _start
_start:
  mov $0xfe000000, %ebx          # the mailbox (zero-extended)
  lea msg_head(%rip), %rsi
  call puts
  # Wakeup for APIC ID 7, which no vCPU has: stays pending (1).
  movl $7, 4(%rbx)
  lea ap_entry(%rip), %rax
  mov %rax, 8(%rbx)
  movw $1, (%rbx)
  movzwl (%rbx), %eax
  call putdigit
  # A reserved command: left as written (5).
  lea msg_reserved(%rip), %rsi
  call puts
  movw $5, (%rbx)
  movzwl (%rbx), %eax
  call putdigit
  # Odd-sized writes: one byte at the command's high half, four bytes
  # straddling reserved and APIC ID, a byte past the OS section.
  movb $0, 1(%rbx)
  movl $0, 2(%rbx)
  movb $0xaa, 2048(%rbx)
  # The good wakeup of AP 1, as Linux does it: ID, vector, then command.
  movl $1, 4(%rbx)
  lea ap_entry(%rip), %rax
  mov %rax, 8(%rbx)
  movw $1, (%rbx)
1: movzwl (%rbx), %eax
  test %eax, %eax
  jnz 1b
  lea msg_woke(%rip), %rsi
  call puts
  call putdigit
  # Wait for the AP to count its entry.
2: pause
  cmpl $1, entries(%rip)
  jb 2b
  # Again for AP 1: it no longer reads the mailbox, so nothing acts (1).
  movw $1, (%rbx)
  mov $20000, %ecx
3: pause
  loop 3b
  lea msg_repeat(%rip), %rsi
  call puts
  movzwl (%rbx), %eax
  call putdigit
  lea msg_entries(%rip), %rsi
  call puts
  mov entries(%rip), %eax
  call putdigit
  lea msg_fw(%rip), %rsi
  call puts
  movzbl 2048(%rbx), %eax
  call putdigit
  mov $10, %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
4: hlt
  jmp 4b

# Prints the NUL-terminated string at %rsi.
puts:
  mov $0x3f8, %dx
5: lodsb
  test %al, %al
  jz 6f
  out %al, %dx
  jmp 5b
6: ret

# Prints %eax as one character: '0'..'9', or '?' above 9.
putdigit:
  cmp $9, %eax
  jbe 7f
  mov $('?' - '0'), %eax
7: add $'0', %al
  mov $0x3f8, %dx
  out %al, %dx
  ret

ap_entry:
  lock incl entries(%rip)
8: cli
  hlt
  jmp 8b

msg_head: .asciz "mailbox: unknown="
msg_reserved: .asciz " reserved="
msg_woke: .asciz " woke="
msg_repeat: .asciz " repeat="
msg_entries: .asciz " entries="
msg_fw: .asciz " fw="
.balign 4
entries: .long 0
