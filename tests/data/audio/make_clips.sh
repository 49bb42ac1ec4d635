#!/bin/sh
# Regenerates the speech test clips (Debian bookworm: espeak-ng 1.51, sox 14.4). Committed as FLAC
# so that tests do not depend on the synthesiser's version; the texts are the references for WER/CER.
# Voice cmn-latn-pinyin, not cmn: Debian's cmn voice reads most Han characters as English pinyin.
set -eu
cd "$(dirname "$0")"
ZH="你好，我上周在你们网站买了一台洗衣机，到现在还没有送到。我打了三次客服电话都没有人接，我非常生气。请你们马上给我退款，不然我就去投诉。"
EN="Hello, I ordered a washing machine from your website last week and it still has not arrived. I called customer service three times and nobody answered. I am very angry. Please give me a refund right away, or I will file a complaint."
tmp=$(mktemp -d)
espeak-ng -v cmn-latn-pinyin+f2 -s 130 -w "$tmp/zh.wav" "$ZH"
sox "$tmp/zh.wav" -r 16000 -c 1 -b 16 zh_f2.flac gain -n -1
espeak-ng -v en-us -s 160 -w "$tmp/en.wav" "$EN"
sox "$tmp/en.wav" -r 16000 -c 1 -b 16 en.flac
espeak-ng -v en-us -s 120 -w "$tmp/en20.wav" "$EN"
sox "$tmp/en20.wav" -r 16000 -c 1 -b 16 en_20s.flac
printf '%s\n' "$ZH" > zh_f2.txt
printf '%s\n' "$EN" > en.txt
rm -rf "$tmp"
