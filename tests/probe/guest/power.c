/*
 * power.c - the end of a probe run: the Firecracker-compatible boot timer
 * write and ACPI S5 poweroff through the FADT's hardware-reduced sleep
 * registers (as Linux does it), with an i8042 reset as the last resort.
 */
#include "probe.h"

#define BOOT_TIMER_ADDR 0xc0000000UL
#define BOOT_TIMER_MAGIC 123
#define ACPI_X_WAKE_STATUS 0x80
#define ACPI_X_SLEEP_ENABLE 0x20

void boot_timer_write(void)
{
	mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC);
}

static void gas_write(const struct gas *g, u8 v)
{
	if (g->space == 1)
		outb((u16)g->address, v);
	else if (g->space == 0 && g->address < IDENT_LIMIT)
		mmio_write8(g->address, v);
}

void poweroff(void)
{
	cli();
	if (acpi.have_sleep_regs && acpi.s5_typ >= 0) {
		pr("probe: poweroff via ACPI S5 (slp_typ %d)\n", acpi.s5_typ);
		gas_write(&acpi.sleep_status, ACPI_X_WAKE_STATUS);
		gas_write(&acpi.sleep_control, (u8)(((acpi.s5_typ & 7) << 2) | ACPI_X_SLEEP_ENABLE));
		for (volatile int i = 0; i < 100000; i++)
			;
		fail("still running after the S5 write");
	}
	pr("probe: reset via i8042\n");
	outb(0x64, 0xfe);
	for (;;)
		__asm__ volatile("cli; hlt");
}
