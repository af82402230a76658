# Sourced by guest-image/build.sh and guest-image/kernel/build.sh: sets
# MIRROR and SECMIRROR, the Debian archive and security archive the private
# apt fetches from. B2P_DEBIAN_MIRROR / B2P_SECURITY_MIRROR win; else they are
# the ones the host's own apt uses (deb822 `URIs:` in sources.list.d/*.sources,
# or one-line `deb URI SUITE` entries), so no host name is written here.
host_apt_uris() { # prints "URI SUITES..." a line, for every deb source
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN{RS=""} /(^|\n)Types:[^\n]*deb([ \n]|$)/ {
           u=""; s=""
           n=split($0, l, "\n")
           for (i=1; i<=n; i++) {
             if (l[i] ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", l[i]); split(l[i], w, " "); u=w[1] }
             if (l[i] ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", l[i]); s=l[i] }
           }
           if (u != "") print u, s
         }' "$f"
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i+1) }' || true
}
if [ -z "${B2P_DEBIAN_MIRROR:-}" ] || [ -z "${B2P_SECURITY_MIRROR:-}" ]; then
  _uris=$(host_apt_uris)
  : "${B2P_DEBIAN_MIRROR:=$(echo "$_uris" | awk '$0 !~ /-security/ {print $1; exit}')}"
  : "${B2P_SECURITY_MIRROR:=$(echo "$_uris" | awk '$0 ~ /-security/ {print $1; exit}')}"
  unset _uris
fi
MIRROR=${B2P_DEBIAN_MIRROR%/}
SECMIRROR=${B2P_SECURITY_MIRROR%/}
if [ -z "$MIRROR" ] || [ -z "$SECMIRROR" ]; then
  echo "guest-image: no Debian mirror: the host's apt sources name none (set B2P_DEBIAN_MIRROR and B2P_SECURITY_MIRROR)" >&2
  exit 1
fi
