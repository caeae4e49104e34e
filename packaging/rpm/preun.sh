# tpmkms %preun (Fedora's %systemd_preun): on erase, disable and stop.
if [ $1 -eq 0 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper remove-system-units tpmkmsd.service tpmkmsd.socket || :
    elif [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now tpmkmsd.service tpmkmsd.socket >/dev/null 2>&1 || :
    fi
fi
