/*
 * rng.c - virtio-rng driver test: two 64-byte reads, completion by
 * interrupt (IOAPIC GSI from the DSDT node); the bytes must not be
 * constant and the two reads must differ.
 */
#include "virtio.h"

void virtio_rng_test(struct vdev *d)
{
	if (vdev_init(d, 0) || vq_setup(d, 0))
		return;
	vdev_enable_irq(d);
	if (vdev_driver_ok(d))
		return;
	u8 *buf[2];
	for (int r = 0; r < 2; r++) {
		buf[r] = dma_alloc(64, 16);
		struct vbuf b = { buf[r], 64, 1 };
		if (vq_add(&d->q[0], &b, 1) < 0) {
			fail("rng%u: queue full", d->index);
			return;
		}
		vq_kick(d, &d->q[0]);
		u32 len = 0;
		if (vq_wait(d, &d->q[0], &len, 5000) < 0) {
			fail("rng%u: no completion within 5 s (irqs %u)", d->index, d->irq_count);
			return;
		}
		if (len == 0 || len > 64) {
			fail("rng%u: used length %u", d->index, len);
			return;
		}
		int distinct = 0;
		for (u32 i = 1; i < len; i++)
			distinct |= buf[r][i] != buf[r][0];
		pr("probe: rng%u read %u bytes %02x%02x%02x%02x... irqs=%u\n", d->index, len, buf[r][0],
		   buf[r][1], buf[r][2], buf[r][3], d->irq_count);
		if (!distinct && len > 1)
			fail("rng%u: constant bytes", d->index);
	}
	if (d->missed_irq)
		fail("rng%u: %u completion(s) without an interrupt", d->index, d->missed_irq);
	if (!memcmp(buf[0], buf[1], 64))
		fail("rng%u: two reads returned the same bytes", d->index);
	else
		pr("probe: rng%u ok (interrupt-driven)\n", d->index);
}
