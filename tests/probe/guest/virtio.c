/*
 * virtio.c - virtio-mmio transport (version 2) and split virtqueues, driven
 * as the spec's driver section says: reset, ACKNOWLEDGE, DRIVER, feature
 * negotiation with FEATURES_OK read back, queue setup, DRIVER_OK. Devices
 * are found like the Debian kernel finds them: LNRO0005 nodes in the DSDT
 * with a Memory32Fixed and an Extended Interrupt descriptor in _CRS.
 */
#include "virtio.h"

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_VENDOR_ID 0x00c
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64
#define S_FAILED 128

#define VEC_VIRTIO_BASE 0x30

struct vdev vdevs[VDEV_MAX] __attribute__((section(".bss.noinit")));
int vdev_count;

/* ---- DMA pool: not zeroed at entry (see head.S), handed out zeroed. ---- */
static u8 dma_pool[512 * 1024] __attribute__((aligned(4096), section(".bss.noinit")));
static usize dma_used;

void *dma_alloc(usize size, usize align)
{
	usize off = (dma_used + align - 1) & ~(align - 1);
	if (off + size > sizeof(dma_pool)) {
		fail("dma pool exhausted");
		poweroff();
	}
	dma_used = off + size;
	memset(dma_pool + off, 0, size);
	return dma_pool + off;
}

u64 virt_to_phys(const void *p)
{
	u64 v = (u64)p;
	extern char _pm_start[];
	if (v >= 0xffffffff80000000UL)
		return v - (u64)_pm_start + boot.load_addr;
	return v;
}

static u32 rd(struct vdev *d, u32 off) { return mmio_read32(d->base + off); }
static void wr(struct vdev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

u8 vcfg_read8(struct vdev *d, u32 off) { return mmio_read8(d->base + R_CONFIG + off); }

u32 vcfg_read32(struct vdev *d, u32 off)
{
	u32 gen, v;
	do {
		gen = rd(d, R_CONFIG_GENERATION);
		v = mmio_read32(d->base + R_CONFIG + off);
	} while (gen != rd(d, R_CONFIG_GENERATION));
	return v;
}

u64 vcfg_read64(struct vdev *d, u32 off)
{
	u32 gen, lo, hi;
	do {
		gen = rd(d, R_CONFIG_GENERATION);
		lo = mmio_read32(d->base + R_CONFIG + off);
		hi = mmio_read32(d->base + R_CONFIG + off + 4);
	} while (gen != rd(d, R_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

static const char *id_name(u32 id)
{
	switch (id) {
	case VIRTIO_ID_NET: return "net";
	case VIRTIO_ID_BLOCK: return "blk";
	case VIRTIO_ID_RNG: return "rng";
	case VIRTIO_ID_BALLOON: return "balloon";
	case VIRTIO_ID_VSOCK: return "vsock";
	case VIRTIO_ID_FS: return "fs";
	case 0: return "none";
	default: return "other";
	}
}

/* ---- discovery: AML scan of the DSDT ---- */
void virtio_discover(void)
{
	vdev_count = 0;
	if (!acpi.dsdt || !acpi.dsdt_len)
		return;
	const u8 *aml = (const u8 *)acpi.dsdt, *end = aml + acpi.dsdt_len;
	u32 per_type[32];
	memset(per_type, 0, sizeof(per_type));
	for (const u8 *p = aml + 36; p + 9 <= end; p++) {
		if (p[0] != 0x0d || memcmp(p + 1, "LNRO0005", 8))
			continue;
		/* The node's _CRS follows its _HID: find the two descriptors. */
		u64 base = 0;
		u32 size = 0, gsi = ~0u;
		const u8 *lim = p + 160 < end ? p + 160 : end;
		for (const u8 *q = p + 9; q + 12 <= lim; q++) {
			if (q[0] == 0x0d && q + 9 <= lim && !memcmp(q + 1, "LNRO0005", 8))
				break;	/* the next node */
			if (!base && q[0] == 0x86 && q[1] == 0x09 && q[2] == 0x00) {
				base = (u64)q[4] | (u64)q[5] << 8 | (u64)q[6] << 16 | (u64)q[7] << 24;
				size = (u32)q[8] | (u32)q[9] << 8 | (u32)q[10] << 16 | (u32)q[11] << 24;
				q += 11;
			} else if (gsi == ~0u && q[0] == 0x89 && q[4] >= 1 && q + 9 <= lim) {
				gsi = (u32)q[5] | (u32)q[6] << 8 | (u32)q[7] << 16 | (u32)q[8] << 24;
				q += 8;
			}
			if (base && gsi != ~0u)
				break;
		}
		if (!base || gsi == ~0u) {
			fail("LNRO0005 node at DSDT+0x%lx without Memory32Fixed + Interrupt",
			     (u64)(p - aml));
			continue;
		}
		if (vdev_count >= VDEV_MAX)
			break;
		if (e820_is_ram(base, size) || base < 0xc0000000UL || base + size > 0x100000000UL)
			fail("virtio-mmio window 0x%lx+0x%x is not in the MMIO hole", base, size);
		for (int k = 0; k < vdev_count; k++)
			if (vdevs[k].gsi == gsi || (vdevs[k].base < base + size && base < vdevs[k].base + vdevs[k].size))
				fail("virtio-mmio 0x%lx (gsi %u) collides with 0x%lx (gsi %u)", base, gsi, vdevs[k].base, vdevs[k].gsi);
		struct vdev *d = &vdevs[vdev_count];
		memset(d, 0, sizeof(*d));
		d->base = base;
		d->size = size;
		d->gsi = gsi;
		u32 magic = rd(d, R_MAGIC), version = rd(d, R_VERSION);
		d->device_id = rd(d, R_DEVICE_ID);
		d->index = d->device_id < 32 ? per_type[d->device_id]++ : 0;
		pr("probe: virtio-mmio 0x%lx size 0x%x gsi %u magic=0x%x version=%u id=%u (%s%u) vendor=0x%x\n",
		   base, size, gsi, magic, version, d->device_id, id_name(d->device_id), d->index,
		   rd(d, R_VENDOR_ID));
		if (magic != 0x74726976) {
			fail("virtio-mmio at 0x%lx: bad magic 0x%x", base, magic);
			continue;
		}
		if (version != 2) {
			fail("virtio-mmio at 0x%lx: version %u, want 2 (modern)", base, version);
			continue;
		}
		if (d->device_id == 0)
			continue;	/* placeholder slot */
		vdev_count++;
	}
	pr("probe: virtio devices=%d\n", vdev_count);
}

/* ---- the driver initialisation sequence (virtio 1.2 §3.1.1) ---- */
int vdev_init(struct vdev *d, u64 wanted)
{
	wr(d, R_STATUS, 0);
	if (rd(d, R_STATUS) != 0) {
		fail("%s%u: status not 0 after reset", id_name(d->device_id), d->index);
		return -1;
	}
	wr(d, R_STATUS, S_ACKNOWLEDGE);
	wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr(d, R_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(d, R_DEVICE_FEATURES);
	wr(d, R_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(d, R_DEVICE_FEATURES) << 32;
	d->offered = offered;
	if (!(offered & VIRTIO_F_VERSION_1)) {
		fail("%s%u: VIRTIO_F_VERSION_1 not offered", id_name(d->device_id), d->index);
		wr(d, R_STATUS, S_FAILED);
		return -1;
	}
	u64 f = offered & (wanted | VIRTIO_F_VERSION_1);
	wr(d, R_DRIVER_FEATURES_SEL, 0);
	wr(d, R_DRIVER_FEATURES, (u32)f);
	wr(d, R_DRIVER_FEATURES_SEL, 1);
	wr(d, R_DRIVER_FEATURES, (u32)(f >> 32));
	wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd(d, R_STATUS) & S_FEATURES_OK)) {
		fail("%s%u: FEATURES_OK not accepted", id_name(d->device_id), d->index);
		wr(d, R_STATUS, S_FAILED);
		return -1;
	}
	d->features = f;
	pr("probe: %s%u features offered=0x%lx negotiated=0x%lx\n", id_name(d->device_id), d->index,
	   offered, f);
	return 0;
}

int vq_setup(struct vdev *d, u32 index)
{
	struct vq *q = &d->q[index];
	wr(d, R_QUEUE_SEL, index);
	if (rd(d, R_QUEUE_READY)) {
		fail("%s%u: queue %u already ready", id_name(d->device_id), d->index, index);
		return -1;
	}
	u32 max = rd(d, R_QUEUE_NUM_MAX);
	if (max == 0) {
		fail("%s%u: queue %u not available", id_name(d->device_id), d->index, index);
		return -1;
	}
	u16 size = max < VQ_SIZE ? (u16)max : VQ_SIZE;
	q->index = index;
	q->size = size;
	q->desc = dma_alloc(sizeof(struct vring_desc) * VQ_SIZE, 16);
	q->avail = dma_alloc(sizeof(struct vring_avail), 2);
	q->used = dma_alloc(sizeof(struct vring_used), 4);
	for (u16 i = 0; i < size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->free_head = 0;
	q->num_free = size;
	q->last_used = 0;
	wr(d, R_QUEUE_NUM, size);
	u64 da = virt_to_phys((const void *)q->desc), aa = virt_to_phys((const void *)q->avail),
	    ua = virt_to_phys((const void *)q->used);
	wr(d, R_QUEUE_DESC_LOW, (u32)da);
	wr(d, R_QUEUE_DESC_HIGH, (u32)(da >> 32));
	wr(d, R_QUEUE_DRIVER_LOW, (u32)aa);
	wr(d, R_QUEUE_DRIVER_HIGH, (u32)(aa >> 32));
	wr(d, R_QUEUE_DEVICE_LOW, (u32)ua);
	wr(d, R_QUEUE_DEVICE_HIGH, (u32)(ua >> 32));
	wr(d, R_QUEUE_READY, 1);
	return 0;
}

int vdev_driver_ok(struct vdev *d)
{
	wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u32 s = rd(d, R_STATUS);
	if (s & (S_NEEDS_RESET | S_FAILED) || !(s & S_DRIVER_OK)) {
		fail("%s%u: status 0x%x after DRIVER_OK", id_name(d->device_id), d->index, s);
		return -1;
	}
	return 0;
}

/* ---- interrupts: the device's GSI through the IOAPIC to an IDT vector ---- */
static struct vdev *irq_owner[16];

static void virtio_irq(u8 vector)
{
	struct vdev *d = irq_owner[vector - VEC_VIRTIO_BASE];
	if (!d)
		return;
	u32 isr = rd(d, R_INTERRUPT_STATUS);
	wr(d, R_INTERRUPT_ACK, isr);
	d->isr_bits |= isr;
	d->irq_count++;
}

#define IRQ_STUB(n) static void irq_##n(void) { virtio_irq(VEC_VIRTIO_BASE + n); }
IRQ_STUB(0) IRQ_STUB(1) IRQ_STUB(2) IRQ_STUB(3) IRQ_STUB(4) IRQ_STUB(5) IRQ_STUB(6) IRQ_STUB(7)
IRQ_STUB(8) IRQ_STUB(9) IRQ_STUB(10) IRQ_STUB(11) IRQ_STUB(12) IRQ_STUB(13) IRQ_STUB(14) IRQ_STUB(15)
static const irq_handler irq_stubs[16] = {
	irq_0, irq_1, irq_2, irq_3, irq_4, irq_5, irq_6, irq_7,
	irq_8, irq_9, irq_10, irq_11, irq_12, irq_13, irq_14, irq_15,
};

void vdev_enable_irq(struct vdev *d)
{
	int slot = (int)(d - vdevs);
	if (slot < 0 || slot >= 16)
		return;
	d->vector = (u8)(VEC_VIRTIO_BASE + slot);
	irq_owner[slot] = d;
	irq_set_handler(d->vector, irq_stubs[slot]);
	u32 lid = mmio_read32((acpi.lapic_base ? acpi.lapic_base : 0xfee00000UL) + 0x20) >> 24;
	lapic_enable();	/* a software-disabled LAPIC drops every fixed interrupt */
	ioapic_route(d->gsi, d->vector, lid);
	d->use_irq = 1;
	pr("probe: %s%u gsi %u -> ioapic pin %u -> vector 0x%x (8259 masked)\n",
	   id_name(d->device_id), d->index, d->gsi, d->gsi - acpi.ioapic_gsi_base, d->vector);
}

/* ---- split virtqueue ---- */
int vq_add(struct vq *q, const struct vbuf *bufs, int n)
{
	if (n <= 0 || q->num_free < n)
		return -1;
	u16 head = q->free_head, i = head, last = head;
	for (int k = 0; k < n; k++) {
		volatile struct vring_desc *dd = &q->desc[i];
		dd->addr = virt_to_phys(bufs[k].addr);
		dd->len = bufs[k].len;
		dd->flags = (u16)((bufs[k].device_writes ? VRING_DESC_F_WRITE : 0) |
				  (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		last = i;
		i = dd->next;
	}
	q->free_head = q->desc[last].next;
	q->num_free = (u16)(q->num_free - n);
	u16 ai = q->avail->idx;
	q->avail->ring[ai % q->size] = head;
	barrier();
	q->avail->idx = (u16)(ai + 1);
	return head;
}

void vq_kick(struct vdev *d, struct vq *q)
{
	d->kick_irq = d->irq_count;
	mb();
	if (!(q->used->flags & 1))	/* VRING_USED_F_NO_NOTIFY */
		wr(d, R_QUEUE_NOTIFY, q->index);
}

int vq_pop(struct vq *q, u32 *len)
{
	if (q->last_used == q->used->idx)
		return -1;
	barrier();
	volatile struct vring_used_elem *e = &q->used->ring[q->last_used % q->size];
	u32 id = e->id;
	if (len)
		*len = e->len;
	q->last_used++;
	if (id >= q->size) {
		fail("queue %u: device returned bad id %u", q->index, id);
		return -1;
	}
	/* Free the chain. */
	u16 i = (u16)id, n = 1;
	while ((q->desc[i].flags & VRING_DESC_F_NEXT) && n < q->size) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = (u16)id;
	q->num_free = (u16)(q->num_free + n);
	return (int)id;
}

int vq_wait(struct vdev *d, struct vq *q, u32 *len, u64 timeout_ms)
{
	for (u64 waited = 0;; waited++) {
		u32 seen = d->irq_count;
		if (d->use_irq)	/* an interrupt window: sti's shadow covers the nop */
			__asm__ volatile("sti; nop; cli" ::: "memory");
		int id = vq_pop(q, len);
		if (id >= 0) {
			if (!d->use_irq) {
				u32 isr = rd(d, R_INTERRUPT_STATUS);
				if (isr)
					wr(d, R_INTERRUPT_ACK, isr);
			} else if (d->irq_count == d->kick_irq) {
				/* Used already: its interrupt must still come. */
				for (int t = 0; t < 1000 && d->irq_count == d->kick_irq; t++)
					wait_change(&d->irq_count, d->kick_irq, 1);
				if (d->irq_count == d->kick_irq)
					d->missed_irq++;
			}
			return id;
		}
		if (waited >= timeout_ms)
			return -1;
		if (d->use_irq)
			wait_change(&d->irq_count, seen, 1);
		else
			hold_ms(1);
	}
}
