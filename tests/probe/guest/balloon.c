/*
 * balloon.c - virtio-balloon driver test (probe.balloon=MiB): free page
 * reporting and statistics.
 *
 * Sends one statistics buffer (total and free memory), touches MiB of RAM
 * at BALLOON_BASE (one write per 4 KiB page), reports ranges the device
 * must refuse (unaligned, outside memory, empty) and checks the touched
 * data survived them, then reports the whole touched area as free in
 * 2 MiB ranges (Linux's pageblock size), 16 per chain, and checks the
 * pages read back as zeros. After "touched" and after "reported" it holds
 * probe.balloon_hold_ms (default 2000) so the host test can read the
 * monitor's RSS. The statistics buffer is never taken back: the device's
 * later requests go unanswered, as a driver that hangs would leave them.
 */
#include "virtio.h"

#define BALLOON_F_STATS_VQ (1UL << 1)
#define BALLOON_F_REPORTING (1UL << 5)
#define BALLOON_BASE (128 * MIB)
#define RANGE (2 * MIB)

struct stat_entry {
	u16 tag;
	u64 val;
} __attribute__((packed));

static int range_ok(u64 base, u64 len)
{
	if (!e820_is_ram(base, len))
		return 0;
	if (boot.initrd && boot.initrd < base + len && base < boot.initrd + boot.initrd_size)
		return 0;
	return 1;
}

/* One chain of device-writable ranges (as Linux adds them); waits for it. */
static int report(struct vdev *d, struct vq *q, const u64 *addr, const u32 *len, int n)
{
	struct vbuf b[VQ_SIZE];
	for (int i = 0; i < n; i++) {
		b[i].addr = (void *)addr[i];
		b[i].len = len[i];
		b[i].device_writes = 1;
	}
	if (vq_add(q, b, n) < 0) {
		fail("balloon%u: reporting queue full", d->index);
		return -1;
	}
	vq_kick(d, q);
	u32 used;
	if (vq_wait(d, q, &used, 5000) < 0) {
		fail("balloon%u: report not returned within 5 s", d->index);
		return -1;
	}
	return 0;
}

void virtio_balloon_test(struct vdev *d, u64 mib)
{
	u64 hold = 2000;
	cmdline_u64("probe.balloon_hold_ms", &hold);
	if (vdev_init(d, BALLOON_F_STATS_VQ | BALLOON_F_REPORTING))
		return;
	if (!(d->features & BALLOON_F_REPORTING) || !(d->features & BALLOON_F_STATS_VQ)) {
		fail("balloon%u: STATS_VQ and FREE_PAGE_REPORTING not both offered", d->index);
		return;
	}
	for (u32 i = 0; i < 4; i++)
		if (vq_setup(d, i))
			return;
	vdev_enable_irq(d);
	if (vdev_driver_ok(d))
		return;
	struct vq *statsq = &d->q[2], *repq = &d->q[3];
	u32 num_pages = vcfg_read32(d, 0);
	if (num_pages)
		fail("balloon%u: device asks for %u pages (want 0)", d->index, num_pages);

	u64 len = mib * MIB;
	if (!range_ok(BALLOON_BASE, len)) {
		fail("balloon%u: 0x%lx+%lu MiB is not free RAM (probe.mem too small?)", d->index,
		     (u64)BALLOON_BASE, mib);
		return;
	}

	/* Statistics: total and free memory, in bytes. */
	struct stat_entry *st = dma_alloc(2 * sizeof(*st), 8);
	st[0].tag = 5;	/* MEMTOT */
	st[0].val = boot.ram_total;
	st[1].tag = 4;	/* MEMFREE */
	st[1].val = boot.ram_total - len;
	struct vbuf sb = { st, 2 * sizeof(*st), 0 };
	if (vq_add(statsq, &sb, 1) < 0) {
		fail("balloon%u: stats queue full", d->index);
		return;
	}
	vq_kick(d, statsq);
	pr("probe: balloon%u ready, stats sent (total %lu MiB, free %lu MiB)\n", d->index,
	   boot.ram_total / MIB, (boot.ram_total - len) / MIB);
	hold_ms(hold);

	for (u64 a = BALLOON_BASE; a < BALLOON_BASE + len; a += 4096)
		*(volatile u64 *)phys(a) = a ^ 0x5a5a5a5a5a5a5a5aUL;
	pr("probe: balloon%u touched %lu MiB at 0x%lx\n", d->index, mib, (u64)BALLOON_BASE);
	hold_ms(hold);

	/* Ranges the device must refuse, all over touched pages (or outside
	 * memory): the data there must still be ours afterwards. */
	u64 top = boot.ram_top;
	u64 bad_addr[5] = { BALLOON_BASE + 8, BALLOON_BASE, BALLOON_BASE + 2048, top, 1UL << 40 };
	u32 bad_len[5] = { 4096, 4095, 8192, 4096, 4096 };
	if (report(d, repq, bad_addr, bad_len, 5))
		return;
	u64 kept = 0;
	for (u64 a = BALLOON_BASE; a < BALLOON_BASE + 4 * 4096; a += 4096)
		kept += *(volatile u64 *)phys(a) == (a ^ 0x5a5a5a5a5a5a5a5aUL);
	if (kept != 4)
		fail("balloon%u: refused ranges lost data (%lu of 4 pages kept)", d->index, kept);
	else
		pr("probe: balloon%u bad ranges refused, data kept\n", d->index);

	u64 ranges = 0;
	for (u64 a = BALLOON_BASE; a < BALLOON_BASE + len;) {
		u64 addr[VQ_SIZE];
		u32 l[VQ_SIZE];
		int n = 0;
		for (; n < VQ_SIZE && a < BALLOON_BASE + len; n++, a += RANGE) {
			addr[n] = a;
			l[n] = RANGE;
		}
		if (report(d, repq, addr, l, n))
			return;
		ranges += (u64)n;
	}
	u64 zero = 0;
	for (u64 a = BALLOON_BASE; a < BALLOON_BASE + len; a += 16 * MIB)
		zero += *(volatile u64 *)phys(a) == 0;
	if (zero != len / (16 * MIB))
		fail("balloon%u: %lu of %lu sampled reported pages read back zero", d->index, zero,
		     len / (16 * MIB));
	pr("probe: balloon%u reported %lu MiB in %lu ranges, pages read back zero (irqs %u)\n",
	   d->index, mib, ranges, d->irq_count);
	hold_ms(hold);
}
