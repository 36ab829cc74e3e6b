/*
 * A Multiboot (v1) test kernel: 32-bit, entered in protected mode with
 * paging off. It prints on COM1 what the loader gave it (the boot magic in
 * EAX, the command line, upper memory, the first module's first line, the
 * memory map's entry count) and ends the VM through the debug-exit port
 * 0xf4 with the value 0x10 (exit code 33), or 0x11 when the magic is wrong.
 */
        .code32
        .section .text
        .globl _start

        .align 4
multiboot_header:
        .long 0x1BADB002                /* magic */
        .long 0x00000003                /* page-aligned modules, memory info */
        .long -(0x1BADB002 + 0x00000003)

_start:
        mov     $0x300000, %esp
        mov     %ebx, %edi              /* Multiboot information */
        cmp     $0x2BADB002, %eax
        jne     bad_magic

        lea     s_magic, %esi
        call    puts

        lea     s_cmdline, %esi
        call    puts
        testl   $4, (%edi)              /* flags: cmdline */
        jz      1f
        mov     16(%edi), %esi
        call    puts_line
1:      call    newline

        lea     s_upper, %esi
        call    puts
        mov     8(%edi), %eax           /* mem_upper, KiB */
        call    puthex
        call    newline

        lea     s_mods, %esi
        call    puts
        mov     20(%edi), %eax          /* mods_count */
        call    puthex
        testl   $8, (%edi)
        jz      2f
        cmpl    $0, 20(%edi)
        je      2f
        mov     $' ', %al
        call    putc
        mov     24(%edi), %ebx          /* mods_addr */
        mov     (%ebx), %esi            /* mod_start */
        call    puts_line
2:      call    newline

        lea     s_mmap, %esi
        call    puts
        mov     44(%edi), %eax          /* mmap_length: 24-byte entries */
        xor     %edx, %edx
        mov     $24, %ecx
        div     %ecx
        call    puthex
        call    newline

        mov     $0x10, %eax
        jmp     done
bad_magic:
        lea     s_bad, %esi
        call    puts
        mov     $0x11, %eax
done:
        mov     $0xf4, %dx
        outl    %eax, %dx
        cli
3:      hlt
        jmp     3b

/* putc: %al to COM1, waiting for the transmitter. */
putc:
        push    %edx
        push    %eax
        mov     $0x3fd, %dx
4:      in      %dx, %al
        test    $0x20, %al
        jz      4b
        pop     %eax
        mov     $0x3f8, %dx
        out     %al, %dx
        pop     %edx
        ret

/* puts: the NUL-terminated string at %esi. */
puts:
        lodsb
        test    %al, %al
        jz      5f
        call    putc
        jmp     puts
5:      ret

/* puts_line: at most 40 bytes of %esi, up to a NUL or a newline. */
puts_line:
        mov     $40, %ecx
6:      lodsb
        test    %al, %al
        jz      7f
        cmp     $'\n', %al
        je      7f
        call    putc
        loop    6b
7:      ret

newline:
        mov     $'\n', %al
        jmp     putc

/* puthex: %eax as 8 hex digits. */
puthex:
        mov     %eax, %edx
        mov     $8, %ecx
8:      rol     $4, %edx
        mov     %edx, %eax
        and     $0xf, %eax
        mov     hexdigits(%eax), %al
        call    putc
        loop    8b
        ret

        .section .rodata
hexdigits:      .ascii "0123456789abcdef"
s_magic:        .asciz "multiboot: magic ok\n"
s_bad:          .asciz "multiboot: bad magic\n"
s_cmdline:      .asciz "multiboot: cmdline="
s_upper:        .asciz "multiboot: mem_upper_kib=0x"
s_mods:         .asciz "multiboot: mods=0x"
s_mmap:         .asciz "multiboot: mmap_entries=0x"
