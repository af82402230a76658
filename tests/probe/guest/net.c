/*
 * net.c - virtio-net driver test (probe.net=1): sends an Ethernet frame of
 * ethertype 0x88b5 carrying "b2p-probe net hello" from the MAC in the
 * config space (again every 200 ms until answered), and waits up to
 * probe.net_wait_ms for a 0x88b5 frame whose payload starts "b2p-host";
 * other frames (IPv6 chatter on the TAP) are put back on the RX queue.
 * probe.net=2 (DHCP, for passt): sends a broadcast DHCPDISCOVER instead and
 * waits for the DHCPOFFER to its transaction (UDP 67 -> 68, option 53 = 2),
 * printing the offered address and router.
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1UL << 5)
#define NET_HDR 12		/* virtio_net_hdr_v1 (VERSION_1) */
#define RX_BUF (NET_HDR + 1514)
#define RX_N 8
#define ETHERTYPE_PROBE 0x88b5
#define DHCP_XID 0xb2b2d4c9u
#define DHCP_LEN (14 + 20 + 8 + 240 + 12)

static u16 ip_csum(const u8 *p, u32 n)
{
	u32 s = 0;
	for (u32 i = 0; i + 1 < n; i += 2)
		s += (u32)p[i] << 8 | p[i + 1];
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

/* A broadcast DHCPDISCOVER from mac into f (DHCP_LEN bytes). */
static void dhcp_discover(u8 *f, const u8 *mac)
{
	memset(f, 0, DHCP_LEN);
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	f[12] = 0x08;
	u8 *ip = f + 14, *udp = ip + 20, *b = udp + 8;
	u32 udp_len = DHCP_LEN - 14 - 20;
	ip[0] = 0x45;
	ip[2] = (u8)((DHCP_LEN - 14) >> 8);
	ip[3] = (u8)(DHCP_LEN - 14);
	ip[8] = 64;
	ip[9] = 17;
	memset(ip + 16, 0xff, 4);
	u16 c = ip_csum(ip, 20);
	ip[10] = (u8)(c >> 8);
	ip[11] = (u8)c;
	udp[1] = 68;
	udp[3] = 67;
	udp[4] = (u8)(udp_len >> 8);
	udp[5] = (u8)udp_len;
	b[0] = 1;
	b[1] = 1;
	b[2] = 6;
	b[4] = (u8)(DHCP_XID >> 24);
	b[5] = (u8)(DHCP_XID >> 16);
	b[6] = (u8)(DHCP_XID >> 8);
	b[7] = (u8)DHCP_XID;
	b[10] = 0x80;
	memcpy(b + 28, mac, 6);
	static const u8 tail[] = { 99, 130, 83, 99, 53, 1, 1, 55, 3, 1, 3, 6, 255 };
	memcpy(b + 236, tail, sizeof(tail));
}

/* Whether e (len bytes) is the DHCPOFFER to our DISCOVER; prints it. */
static int dhcp_offer(struct vdev *d, const u8 *e, u32 len)
{
	if (len < 14 + 20 + 8 + 240 || e[12] != 0x08 || e[13] != 0 || e[14 + 9] != 17)
		return 0;
	u32 ihl = (u32)(e[14] & 0xf) * 4;
	const u8 *udp = e + 14 + ihl, *b = udp + 8;
	if (14 + ihl + 8 + 240 > len || udp[0] || udp[1] != 67 || udp[2] || udp[3] != 68)
		return 0;
	if (b[4] != (u8)(DHCP_XID >> 24) || b[5] != (u8)(DHCP_XID >> 16) ||
	    b[6] != (u8)(DHCP_XID >> 8) || b[7] != (u8)DHCP_XID)
		return 0;
	const u8 *end = e + len, *o = b + 240, *router = NULL;
	int type = 0;
	while (o + 2 <= end && o[0] != 255) {
		if (o[0] == 0) {
			o++;
			continue;
		}
		if (o + 2 + o[1] > end)
			break;
		if (o[0] == 53 && o[1] >= 1)
			type = o[2];
		if (o[0] == 3 && o[1] >= 4)
			router = o + 2;
		o += 2 + o[1];
	}
	if (type != 2)
		return 0;
	const u8 *y = b + 16;
	if (router)
		pr("probe: net%u dhcp offer %u.%u.%u.%u router %u.%u.%u.%u from %02x:%02x:%02x:%02x:%02x:%02x\n",
		   d->index, y[0], y[1], y[2], y[3], router[0], router[1], router[2], router[3],
		   e[6], e[7], e[8], e[9], e[10], e[11]);
	else
		pr("probe: net%u dhcp offer %u.%u.%u.%u router none\n", d->index, y[0], y[1], y[2], y[3]);
	return 1;
}

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

	u64 mode = 1;
	cmdline_u64("probe.net", &mode);
	int dhcp = mode == 2;
	u8 *tx = dma_alloc(NET_HDR + DHCP_LEN, 16);
	u8 *f = tx + NET_HDR;
	u32 tx_len = NET_HDR + 60;
	if (dhcp) {
		dhcp_discover(f, mac);
		tx_len = NET_HDR + DHCP_LEN;
	} else {
		memset(f, 0xff, 6);
		memcpy(f + 6, mac, 6);
		f[12] = ETHERTYPE_PROBE >> 8;
		f[13] = ETHERTYPE_PROBE & 0xff;
		memcpy(f + 14, "b2p-probe net hello", 20);
	}

	u64 wait_ms = 20000;
	cmdline_u64("probe.net_wait_ms", &wait_ms);
	int sent = 0, tx_done = 0, got = 0;
	u64 since_tx = 200;
	/* Until both directions are seen: the host frame can land in the RX
	 * ring before the TX completion lands in the TX ring. */
	for (u64 t = 0; t < wait_ms && !(got && tx_done); t++) {
		if (since_tx >= 200 && d->q[1].num_free) {
			struct vbuf vb = { tx, tx_len, 0 };
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
			if (dhcp) {
				if (!got && len > NET_HDR && dhcp_offer(d, e, len - NET_HDR))
					got = 1;
			} else if (len >= NET_HDR + 14 + 8 && e[12] == (ETHERTYPE_PROBE >> 8) &&
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
