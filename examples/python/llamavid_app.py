#!/usr/bin/env python3
"""A Python (PyGObject) application using llamavidcaption: prints every caption the element
posts on the bus, and every LlamaVidCaptionMeta it finds on the video buffers, one JSON object
per line:

    message {"text": "...", "start": 0, "end": 2900000000, "pts": ..., "frames": 30, ...}
    meta {"buffer_pts": 3000000000, "text": "...", "start": 0, ...}

and at the end `summary {"messages": N, "metas": M}`.

    GST_PLUGIN_PATH=target/release python3 examples/python/llamavid_app.py --model DIR \\
        [--source FRAGMENT] [--prompt Q] [--set PROPERTY=VALUE]...

--source is a gst-launch fragment producing raw video (default: 3 s of a test pattern); the
video plays at its pace, as in an app that shows it. The plugin must be installed or on
GST_PLUGIN_PATH. Needs the system packages python3-gi and gir1.2-gstreamer-1.0 (a virtualenv
without system site packages does not see them: use /usr/bin/python3).
"""

import argparse
import json
import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, GObject, Gst  # noqa: E402

CAPTION_MESSAGE = "llamavid-caption"
CAPTION_META = "LlamaVidCaptionMeta"
DEFAULT_SOURCE = (
    "videotestsrc num-buffers=30 pattern=ball ! "
    "video/x-raw,width=320,height=240,framerate=10/1"
)


def structure_fields(structure):
    """Every field of a GstStructure as a Python value (strings, ints)."""
    return {
        structure.nth_field_name(i): structure.get_value(structure.nth_field_name(i))
        for i in range(structure.n_fields())
    }


def property_value(element, name, text):
    """`text` as a value of the property `name`, parsed as gst-launch parses it (enums by nick,
    booleans, numbers); ValueError when it is not one. (Gst.util_set_object_arg would only log
    a debug line for a typo and keep the old value.)"""
    pspec = element.find_property(name)
    if pspec is None:
        raise ValueError(f"{element.get_factory().get_name()} has no property {name!r}")
    if not pspec.flags & GObject.ParamFlags.WRITABLE:
        raise ValueError(f"the property {name!r} is read-only")
    if pspec.value_type == GObject.TYPE_STRING:
        return text
    try:
        structure, _ = Gst.Structure.from_string(
            f"setting, value=({pspec.value_type.name}){text}")
    except TypeError:
        structure = None
    if structure is None:
        raise ValueError(f"{text!r} is not a value of {name!r} ({pspec.blurb})")
    value = structure.get_value("value")
    # Numeric properties have a range; GObject would warn and keep the old value.
    if hasattr(pspec, "minimum") and not pspec.minimum <= value <= pspec.maximum:
        raise ValueError(f"{text} is outside {pspec.minimum}..{pspec.maximum} ({pspec.blurb})")
    return value


def emit(kind, fields):
    print(kind, json.dumps(fields, ensure_ascii=False), flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="gst-launch fragment producing raw video")
    parser.add_argument("--prompt", help="the question asked of every window")
    parser.add_argument("--set", action="append", default=[], metavar="PROPERTY=VALUE",
                        help="any llamavidcaption property (repeatable)")
    return parser.parse_args()


def main():
    args = parse_args()
    Gst.init(None)
    if Gst.ElementFactory.find("llamavidcaption") is None:
        sys.exit("error: no llamavidcaption element: install the plugin or point "
                 "GST_PLUGIN_PATH at the directory holding libgstllamavid.so")
    try:
        pipeline = Gst.parse_launch(
            f"{args.source} ! llamavidcaption name=captioner ! fakesink name=video sync=true "
            "captioner.text_src ! fakesink sync=false")
    except GLib.Error as e:
        sys.exit(f"error: cannot build the pipeline: {e.message}")
    captioner = pipeline.get_by_name("captioner")
    captioner.set_property("model", args.model)
    if args.prompt is not None:
        captioner.set_property("prompt", args.prompt)
    for setting in args.set:
        name, sep, value = setting.partition("=")
        if not sep:
            sys.exit(f"error: --set {setting}: expected PROPERTY=VALUE")
        try:
            captioner.set_property(name, property_value(captioner, name, value))
        except ValueError as e:
            sys.exit(f"error: --set {setting}: {e}")

    counts = {"messages": 0, "metas": 0}

    def on_video_buffer(_pad, info):
        buffer = info.get_buffer()
        meta = buffer.get_custom_meta(CAPTION_META) if buffer is not None else None
        if meta is not None:
            counts["metas"] += 1
            fields = {"buffer_pts": buffer.pts}
            fields.update(structure_fields(meta.get_structure()))
            emit("meta", fields)
        return Gst.PadProbeReturn.OK

    video_sink_pad = pipeline.get_by_name("video").get_static_pad("sink")
    video_sink_pad.add_probe(Gst.PadProbeType.BUFFER, on_video_buffer)

    loop = GLib.MainLoop()
    failure = []

    def on_message(_bus, message):
        if message.type == Gst.MessageType.ELEMENT:
            structure = message.get_structure()
            if structure is not None and structure.get_name() == CAPTION_MESSAGE:
                counts["messages"] += 1
                emit("message", structure_fields(structure))
        elif message.type == Gst.MessageType.WARNING:
            warning, debug = message.parse_warning()
            print(f"warning: {warning.message} ({debug})", file=sys.stderr)
        elif message.type == Gst.MessageType.ERROR:
            error, debug = message.parse_error()
            failure.append(f"{message.src.get_name()}: {error.message} ({debug})")
            loop.quit()
        elif message.type == Gst.MessageType.EOS:
            loop.quit()

    bus = pipeline.get_bus()
    bus.add_signal_watch()
    bus.connect("message", on_message)
    if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
        # The element posts why (a model that cannot load, ...) as an error on the bus.
        message = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.ERROR)
        reason = message.parse_error()[0].message if message else "no error posted"
        pipeline.set_state(Gst.State.NULL)
        sys.exit(f"error: the pipeline does not start: {reason}")
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    pipeline.set_state(Gst.State.NULL)
    bus.remove_signal_watch()
    emit("summary", counts)
    if failure:
        sys.exit("error: " + failure[0])


if __name__ == "__main__":
    main()
