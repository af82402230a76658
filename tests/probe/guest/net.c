/*
 * net.c - virtio-net driver test (probe.net=1): sends an Ethernet frame of
 * ethertype 0x88b5 carrying "b2p-probe net hello" from the MAC in the
 * config space (again every 200 ms until answered), and waits up to
 * probe.net_wait_ms for a 0x88b5 frame whose payload starts "b2p-host";
 * other frames (IPv6 chatter on the TAP) are put back on the RX queue.
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1UL << 5)
#define NET_HDR 12		/* virtio_net_hdr_v1 (VERSION_1) */
#define RX_BUF (NET_HDR + 1514)
#define RX_N 8
#define ETHERTYPE_PROBE 0x88b5

void virtio_net_test(struct vdev *d)
{
	if (vdev_init(d, VIRTIO_NET_F_MAC) || vq_setup(d, 0) || vq_setup(d, 1))
		return;
	vdev_enable_irq(d);
	u8 mac[6];
	for (int i = 0; i < 6; i++)
		mac[i] = vcfg_read8(d, (u32)i);
	u8 *rx[VQ_SIZE];
	memset(rx, 0, sizeof(rx));
	for (int i = 0; i < RX_N; i++) {
		u8 *b = dma_alloc(RX_BUF, 16);
		struct vbuf vb = { b, RX_BUF, 1 };
		int id = vq_add(&d->q[0], &vb, 1);
		if (id < 0)
			break;
		rx[id] = b;
	}
	if (vdev_driver_ok(d))
		return;
	vq_kick(d, &d->q[0]);
	pr("probe: net%u mac %02x:%02x:%02x:%02x:%02x:%02x\n", d->index, mac[0], mac[1], mac[2], mac[3],
	   mac[4], mac[5]);

	u8 *tx = dma_alloc(NET_HDR + 64, 16);
	u8 *f = tx + NET_HDR;
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE_PROBE >> 8;
	f[13] = ETHERTYPE_PROBE & 0xff;
	memcpy(f + 14, "b2p-probe net hello", 20);

	u64 wait_ms = 20000;
	cmdline_u64("probe.net_wait_ms", &wait_ms);
	int sent = 0, tx_done = 0, got = 0;
	u64 since_tx = 200;
	/* Until both directions are seen: the host frame can land in the RX
	 * ring before the TX completion lands in the TX ring. */
	for (u64 t = 0; t < wait_ms && !(got && tx_done); t++) {
		if (since_tx >= 200 && d->q[1].num_free) {
			struct vbuf vb = { tx, NET_HDR + 60, 0 };
			if (vq_add(&d->q[1], &vb, 1) >= 0) {
				vq_kick(d, &d->q[1]);
				sent++;
			}
			since_tx = 0;
		}
		u32 len;
		while (vq_pop(&d->q[1], &len) >= 0)
			if (!tx_done++)
				pr("probe: net%u tx ok (frame sent)\n", d->index);
		int id;
		while ((id = vq_pop(&d->q[0], &len)) >= 0) {
			u8 *b = rx[id];
			if (!b)
				continue;
			u8 *e = b + NET_HDR;
			if (len >= NET_HDR + 14 + 8 && e[12] == (ETHERTYPE_PROBE >> 8) &&
			    e[13] == (ETHERTYPE_PROBE & 0xff) && !memcmp(e + 14, "b2p-host", 8)) {
				char msg[33];
				u32 n = len - NET_HDR - 14;
				n = n > 32 ? 32 : n;
				memcpy(msg, e + 14, n);
				msg[n] = 0;
				for (u32 k = 0; k < n; k++)
					if (msg[k] && (msg[k] < 0x20 || msg[k] > 0x7e))
						msg[k] = '.';
				pr("probe: net%u rx ok from %02x:%02x:%02x:%02x:%02x:%02x \"%s\"\n", d->index,
				   e[6], e[7], e[8], e[9], e[10], e[11], msg);
				got = 1;
			}
			struct vbuf vb = { b, RX_BUF, 1 };
			int nid = vq_add(&d->q[0], &vb, 1);
			if (nid >= 0) {
				rx[nid] = b;
				vq_kick(d, &d->q[0]);
			}
		}
		if (!(got && tx_done)) {
			wait_change(&d->irq_count, d->irq_count, 1);
			since_tx++;
		}
	}
	if (!tx_done)
		fail("net%u: no TX completion (%d frames queued)", d->index, sent);
	if (!got)
		fail("net%u: no frame from the host within %lu ms", d->index, wait_ms);
}
