# Sourced by guest-image/build.sh and guest-image/kernel/build.sh, after
# mirror.sh (MIRROR, SECMIRROR) and with SUITE set: the private apt both use.
#
#   private_apt DIR ARCHIVES
#
# writes under DIR an apt with an empty dpkg status and DIR/etc/apt/sources.list
# naming $SUITE, $SUITE-updates and $SUITE-security, that downloads .debs into
# ARCHIVES and never installs recommends; it leaves APT_CONFIG to the caller
# (DIR/apt.conf), so the host's own apt is never touched.
private_apt() {
  local A=$1 archives=$2 kr=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$kr" ] || { echo "guest-image: $kr missing: apt-get install debian-archive-keyring" >&2; return 1; }
  mkdir -p "$A/etc/apt/apt.conf.d" "$A/etc/apt/preferences.d" "$A/etc/apt/sources.list.d" \
    "$A/lists/partial" "$A/cache" "$archives/partial"
  : >"$A/status"
  cat >"$A/etc/apt/sources.list" <<SRC
deb [signed-by=$kr] $MIRROR $SUITE main
deb [signed-by=$kr] $MIRROR $SUITE-updates main
deb [signed-by=$kr] $SECMIRROR $SUITE-security main
SRC
  cat >"$A/apt.conf" <<CONF
Dir "$A/";
Dir::Etc "$A/etc/apt/";
Dir::State "$A/";
Dir::State::lists "$A/lists/";
Dir::State::status "$A/status";
Dir::Cache "$A/cache/";
Dir::Cache::archives "$archives/";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Debug::NoLocking "true";
Acquire::Languages "none";
CONF
}
