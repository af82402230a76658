#!/bin/sh
# Agent hook: the init runs this (unless the kernel command line says
# b2p.agent=0) once the data disk and the network are up. Output goes to
# /var/log/b2p-agent.log. --podman-at-start: Podman's REST service starts now,
# and the agent opens its ports once it answers and (--wait-milestone) the
# init has loaded the busybox image, so a host that reaches the agent reaches
# a Podman that has it.
if [ ! -x /usr/bin/b2p-agent ]; then
  echo "b2p-agent: /usr/bin/b2p-agent is not in this image"
  exit 0
fi
# The host's proxy settings (the init writes them from b2p.proxy.*): the
# agent and the Podman service it starts pull through that proxy.
[ -r /etc/profile.d/b2p-proxy.sh ] && . /etc/profile.d/b2p-proxy.sh
exec /usr/bin/b2p-agent --podman-at-start --wait-milestone busybox-image
