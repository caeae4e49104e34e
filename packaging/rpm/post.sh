# tpmkms %post (Fedora's %systemd_post and %tmpfiles_create): on first install
# the units are enabled or not as the distribution's presets say; nothing is
# started. /var/lib/tpmkms is made, never emptied.
if [ $1 -eq 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper install-system-units tpmkmsd.service tpmkmsd.socket || :
    elif [ -d /run/systemd/system ]; then
        systemctl --no-reload preset tpmkmsd.service tpmkmsd.socket >/dev/null 2>&1 || :
    fi
fi
systemd-tmpfiles --create tpmkms.conf >/dev/null 2>&1 || :
