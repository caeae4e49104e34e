# tpmkms %postun (Fedora's %systemd_postun_with_restart): on upgrade, restart
# a running daemon. /var/lib/tpmkms and the tpmkms user stay on erase: the
# sealed cache may hold the only copy of the cluster's keys.
if [ $1 -ge 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper mark-restart-system-units tpmkmsd.service || :
    elif [ -d /run/systemd/system ]; then
        systemctl try-restart tpmkmsd.service >/dev/null 2>&1 || :
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
