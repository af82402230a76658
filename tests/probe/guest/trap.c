/*
 * trap.c - interrupts: the IDT (all 256 vectors go to head.S stubs), the
 * 8259 PIC masked before anything enables interrupts, exceptions reported
 * as FAIL lines, device IRQ handlers, and a LAPIC-timer sleep (hold_ms).
 */
#include "probe.h"

#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_MASKED (1u << 16)

#define VEC_TIMER 0xf0
#define VEC_SPURIOUS 0xff

struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type_attr;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} __attribute__((packed));

extern const u64 isr_table[256];
static struct idt_gate idt[256] __attribute__((aligned(16)));
static irq_handler handlers[256];
static volatile u64 ticks;
static volatile int in_exception;

static u64 lapic_base(void)
{
	return acpi.lapic_base ? acpi.lapic_base : 0xfee00000UL;
}

void pic_mask(void)
{
	/* KVM routes GSI 0-15 to its 8259 as well: mask both PICs. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

void lapic_eoi(void)
{
	mmio_write32(lapic_base() + LAPIC_EOI, 0);
}

void irq_set_handler(u8 vector, irq_handler h)
{
	handlers[vector] = h;
}

void trap_init(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	/* Exceptions, device IRQs (0x20-0x3f) and the LAPIC vectors (0xf0-0xff);
	 * a stray vector elsewhere raises #NP, which is reported. */
	for (int v = 0; v < 256; v++) {
		if (v == 64)
			v = 0xf0;
		u64 a = isr_table[v];
		idt[v].off_lo = (u16)a;
		idt[v].sel = cs;
		idt[v].ist = 0;
		idt[v].type_attr = 0x8e;	/* present, DPL0, 64-bit interrupt gate */
		idt[v].off_mid = (u16)(a >> 16);
		idt[v].off_hi = (u32)(a >> 32);
		idt[v].zero = 0;
	}
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(desc));
	pic_mask();
	pr("probe: idt loaded cs=0x%x, 8259 masked\n", cs);
}

static void timer_tick(void)
{
	ticks++;
}

void trap_dispatch(struct trap_frame *f)
{
	u64 v = f->vector;
	if (v < 32) {
		if (in_exception++) {
			for (;;)
				__asm__ volatile("cli; hlt");
		}
		u64 cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		fail("exception %lu error=0x%lx rip=0x%lx cr2=0x%lx rsp=0x%lx", v, f->error, f->rip, cr2, f->rsp);
		poweroff();
	}
	if (v == VEC_SPURIOUS)
		return;
	if (handlers[v])
		handlers[v]();
	else
		pr("probe: unexpected interrupt vector %lu\n", v);
	lapic_eoi();
}

static int timer_ready;

/*
 * KVM's LAPIC timer counts 1 ns bus cycles, so a one-shot count of
 * ms * 10^6 at divide-by-1 is ms milliseconds.
 */
static void timer_arm(u64 ms)
{
	u64 base = lapic_base();
	if (!timer_ready) {
		irq_set_handler(VEC_TIMER, timer_tick);
		mmio_write32(base + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
		mmio_write32(base + LAPIC_TIMER_DIV, 0xb);	/* divide by 1 */
		mmio_write32(base + LAPIC_LVT_TIMER, VEC_TIMER);	/* one-shot */
		timer_ready = 1;
	}
	mmio_write32(base + LAPIC_TIMER_INIT, (u32)(ms * 1000000));
}

/* Sleeps with interrupts enabled only while halted. */
void hold_ms(u64 ms)
{
	while (ms) {
		u64 chunk = ms > 1000 ? 1000 : ms;
		u64 start = ticks;
		timer_arm(chunk);
		while (ticks == start) {
			sti_hlt();
			cli();
		}
		ms -= chunk;
	}
}

/* Sleeps up to ms, or until *flag moves away from seen (an IRQ handler). */
int wait_change(volatile u32 *flag, u32 seen, u64 ms)
{
	u64 start = ticks;
	if (*flag != seen)
		return 1;
	timer_arm(ms ? (ms > 1000 ? 1000 : ms) : 1);
	while (*flag == seen && ticks == start) {
		sti_hlt();
		cli();
	}
	return *flag != seen;
}

/* Enables the local APIC (software enable, spurious vector). */
void lapic_enable(void)
{
	mmio_write32(lapic_base() + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
}
