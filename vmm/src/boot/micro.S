/* The micro guest (see micro.rs): real mode, loaded at 0x1000 with every segment 0.
 * IRQ0 is remapped to vector 0x20 so it clears the CPU's exception vectors; the slave
 * PIC is masked. The PIT runs at 100 Hz (divisor 11932). Each interrupt writes the
 * interrupt count into one of 64 pages from 0x20000, so every epoch has dirty pages
 * to send; every tenth prints "tick N" with a 32-bit N, so lines stay numbered for
 * 13 years of uptime. Registers are saved with pusha only: the 32-bit halves it
 * clobbers belong to the idle loop, which uses none. */
        .code16
        .text
        .globl _start
_start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7000, %sp
        movw $handler, 0x80
        movw $0, 0x82
        mov $0x11, %al
        out %al, $0x20
        mov $0x20, %al
        out %al, $0x21
        mov $0x04, %al
        out %al, $0x21
        mov $0x01, %al
        out %al, $0x21
        mov $0xfe, %al
        out %al, $0x21
        mov $0x11, %al
        out %al, $0xa0
        mov $0x28, %al
        out %al, $0xa1
        mov $0x02, %al
        out %al, $0xa1
        mov $0x01, %al
        out %al, $0xa1
        mov $0xff, %al
        out %al, $0xa1
        mov $0x34, %al
        out %al, $0x43
        mov $0x9c, %al
        out %al, $0x40
        mov $0x2e, %al
        out %al, $0x40
        sti
idle:
        hlt
        jmp idle

handler:
        pusha
        incw irqs
        mov irqs, %ax
        and $0x3f, %ax
        shl $12, %ax
        mov %ax, %di
        mov $0x2000, %ax
        mov %ax, %es
        mov irqs, %ax
        mov %ax, %es:(%di)
        xor %ax, %ax
        mov %ax, %es
        mov irqs, %ax
        xor %dx, %dx
        mov $10, %bx
        div %bx
        test %dx, %dx
        jnz done
        incl ticks
        mov $0x3f8, %dx
        mov $msg, %si
1:      lodsb
        test %al, %al
        jz 2f
        out %al, %dx
        jmp 1b
2:      mov ticks, %eax
        xor %cx, %cx
        mov $10, %ebx
3:      xor %edx, %edx
        div %ebx
        push %dx
        inc %cx
        test %eax, %eax
        jnz 3b
        mov $0x3f8, %dx
4:      pop %ax
        add $'0', %al
        out %al, %dx
        loop 4b
        mov $'\n', %al
        out %al, %dx
done:
        mov $0x20, %al
        out %al, $0x20
        popa
        iret

msg:    .asciz "tick "
        .balign 4
ticks:  .long 0
irqs:   .word 0
