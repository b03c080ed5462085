"""`avlabel synth`: procedural dashcam-like clips whose labels agree with their pixels.

The embedded default dataset: anyone can build, train and evaluate without real data.
Each clip is drawn from a `Scene` (weather, lighting, road, traffic light, vehicles,
pedestrian) seen from the ego vehicle driving forward; its label is written from the
same `Scene`, so what the label says is what is drawn:

* weather: sky colour and clouds, rain streaks (sparse or dense), snow flakes and snowy
  shoulders, fog that swallows the distance;
* lighting: brightness, contrast and tint of the whole picture; a sun disc in direct
  sunlight; at night headlights only, or street lamps with pools of light;
* traffic light: an overhead signal whose lit lamp (red left, yellow centre, green
  right, with a glow) is drawn large, at least 20 px across once the clip is sampled
  down to a tiny model's resolution (a ~10 px lamp was never learned, see STACK_NOTES);
  the ego vehicle stops for red, slows for yellow and keeps its speed for green;
* vehicles ahead (a lead car means "Vehicle following"), oncoming and parked cars;
* a pedestrian crossing ("Yield to VRUs"; outside a zebra crossing it is jaywalking,
  the one rule violation drawn);
* difficulty from weather, darkness, pedestrians and traffic.

Clips are H.264 (yuv420p) in the recipe's layout: `videos/<id>.camera_front_wide_120fov.mp4`
and `metas/<id>.label.json`. Clip `i` of seed `s` is the same whatever the number of
clips asked for, ids included, so a run that is interrupted resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avlabel.core.layouts import CAMERA_SUFFIX, LABEL_SUFFIX
from avlabel.core.schema import FIELDS_BY_NAME, label_to_json, normalize_label

VIDEO_SUFFIX = CAMERA_SUFFIX + ".mp4"

# every weather the renderer can draw ("N/A" is for clips where the sky can't be judged)
WEATHERS = tuple(w for w in FIELDS_BY_NAME["weather"].choices if w != "N/A")
LIGHTINGS = FIELDS_BY_NAME["lighting"].choices
SUNNY_WEATHERS = ("Clear skies", "Partly cloudy")  # direct sunlight needs a sky the sun gets through
LIGHT_STATES = ("none", "red", "yellow", "green")


@dataclass(frozen=True)
class Road:
    road_type: str
    lane_type: str
    lanes_per_direction: int
    oncoming: bool  # a divided highway has no oncoming lanes in view
    centre_line: str  # "dashed_white" | "solid_yellow" | "double_yellow" | "barrier"
    roadside: str  # "sidewalk" | "grass"
    speed: float  # cruising speed, m/s


ROADS = (
    Road("Local street - low speed, residential", "One lane in each direction, no turn lanes",
         1, True, "dashed_white", "sidewalk", 8.0),
    Road("Collector road - moderate speed with driveways and intersections", "One lane in each direction",
         1, True, "solid_yellow", "grass", 11.0),
    Road("Arterial road - several lanes of through traffic", "Two lanes in each direction",
         2, True, "double_yellow", "sidewalk", 13.0),
    Road("Highway - divided, high speed", "Two lanes in the ego vehicle's direction, divided from oncoming traffic",
         2, False, "barrier", "grass", 20.0),
)
HIGHWAY = ROADS[3]


@dataclass(frozen=True)
class Vehicle:
    kind: str  # "lead" (ego lane, ahead) | "adjacent" (same direction, next lane) | "oncoming" | "parked"
    lateral: float  # metres right of the ego lane centre
    distance: float  # metres ahead at the start of the clip
    speed: float  # metres per second towards the ego vehicle (relative)
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    """Everything that is drawn; the label is written from it."""

    weather: str
    lighting: str
    road: Road
    light: str  # one of LIGHT_STATES
    vehicles: tuple[Vehicle, ...]
    pedestrian: bool
    pedestrian_from_left: bool
    crosswalk: bool
    sign: str  # "none" | "speed_limit" | "crossing"
    pedestrian_colour: tuple[float, float, float] = (0.9, 0.2, 0.2)
    noise_seed: int = 0

    @property
    def lead(self) -> bool:
        return any(v.kind == "lead" for v in self.vehicles)

    @property
    def junction(self) -> bool:
        return self.light != "none" or self.crosswalk

    @property
    def stops(self) -> bool:
        """The ego vehicle comes to a halt: a red light or a pedestrian in its path."""
        return self.light == "red" or self.pedestrian

    @property
    def night(self) -> bool:
        return self.lighting.startswith("Night")


# ----------------------------------------------------------------------------- scene sampling

_CAR_COLOURS = ((0.75, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.15, 0.15, 0.15), (0.9, 0.75, 0.2),
                (0.3, 0.5, 0.35), (0.55, 0.55, 0.6))
_WHITE, _YELLOW = (0.92, 0.92, 0.9), (0.9, 0.75, 0.15)  # road paint
_CLOTHES = ((0.95, 0.25, 0.2), (0.2, 0.35, 0.95), (0.95, 0.8, 0.15), (0.2, 0.8, 0.3), (0.95, 0.55, 0.1))


def clip_id(seed: int, index: int) -> str:
    """A uuid-like id that depends only on (seed, index)."""
    digest = hashlib.sha256(f"avlabel-synthetic:{seed}:{index}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def sample_scene(seed: int, index: int) -> Scene:
    rng = np.random.default_rng([seed, index])
    lighting = LIGHTINGS[rng.integers(len(LIGHTINGS))]
    weathers = SUNNY_WEATHERS if lighting == "Daytime (direct sunlight)" else WEATHERS
    weather = weathers[rng.integers(len(weathers))]
    road = ROADS[rng.choice(len(ROADS), p=[0.3, 0.3, 0.25, 0.15])]
    if road is HIGHWAY:
        light, pedestrian, crosswalk = "none", False, False
    else:
        light = LIGHT_STATES[rng.integers(len(LIGHT_STATES))]
        # pedestrians cross where the ego vehicle has no right of way: at its red light, or with no light
        pedestrian = light in ("none", "red") and rng.random() < 0.5
        crosswalk = light != "none" or (pedestrian and rng.random() < 0.6)

    vehicles = []
    count = rng.choice(4, p=[0.3, 0.3, 0.25, 0.15])
    # a car waiting at a red light would hide the crossing pedestrian, so that scene has no lead car
    kinds = [] if (pedestrian and light == "red") else ["lead"]
    kinds += ["adjacent"] if road.lanes_per_direction > 1 else []
    kinds += ["oncoming"] if road.oncoming else []
    kinds += ["parked"] if road.roadside == "sidewalk" and road.lanes_per_direction == 1 else []
    for kind in rng.permutation(kinds)[:count]:
        colour = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))]
        if kind == "lead":
            # with a pedestrian, the lead car has already passed the crossing the pedestrian walks on
            gap = rng.uniform(11.0, 13.0) if pedestrian else rng.uniform(7.0, 9.0)
            vehicles.append(Vehicle("lead", 0.0, float(gap), 0.0, colour))
        elif kind == "adjacent":
            vehicles.append(Vehicle("adjacent", -3.5, float(rng.uniform(9.0, 14.0)), float(rng.uniform(-1.0, 1.0)), colour))
        elif kind == "oncoming":
            lateral = -3.5 * road.lanes_per_direction - 0.2
            vehicles.append(Vehicle("oncoming", lateral, float(rng.uniform(40.0, 60.0)), road.speed + 8.0, colour))
        else:
            vehicles.append(Vehicle("parked", 3.2, float(rng.uniform(25.0, 40.0)), 0.0, colour))
    if crosswalk and rng.random() < 0.5:
        sign = "crossing"
    else:
        sign = "speed_limit" if rng.random() < 0.5 else "none"
    return Scene(
        weather=weather,
        lighting=lighting,
        road=road,
        light=light,
        vehicles=tuple(sorted(vehicles, key=lambda v: v.kind)),
        pedestrian=bool(pedestrian),
        pedestrian_from_left=bool(rng.random() < 0.5),
        crosswalk=bool(crosswalk),
        sign=sign,
        pedestrian_colour=_CLOTHES[rng.integers(len(_CLOTHES))],
        noise_seed=int(rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------- labels

_WEATHER_POINTS = {"Light rain": 1, "Light snow": 1, "Heavy rain": 2, "Dense fog": 2}
_WEATHER_WORDS = {
    "Clear skies": "under a clear sky",
    "Overcast": "under an overcast sky",
    "Partly cloudy": "under a partly cloudy sky",
    "Light rain": "in light rain",
    "Heavy rain": "in heavy rain",
    "Light snow": "in light snow",
    "Dense fog": "in dense fog",
}
_LIGHT_WORDS = {
    "Daytime (diffused light)": "in soft daylight",
    "Daytime (low-contrast daylight)": "in flat, low-contrast daylight",
    "Daytime (direct sunlight)": "in bright sunshine",
    "Night (poorly lit; few/no streetlights)": "at night with no street lighting, only its headlights",
    "Night (well-lit by streetlights)": "at night on a road lit by street lamps",
}
_LIGHT_TEXT = {
    "none": "No traffic light",
    "red": "The traffic light ahead is red, so the ego vehicle slows down and stops at the stop line.",
    "yellow": "The traffic light ahead is yellow; the ego vehicle slows down as it approaches the junction.",
    "green": "The traffic light ahead is green, so the ego vehicle keeps its speed towards the junction.",
}


def difficulty(scene: Scene) -> int:
    """1 to 4 from what makes driving harder: bad weather, darkness, pedestrians, traffic."""
    points = _WEATHER_POINTS.get(scene.weather, 0)
    points += scene.lighting == "Night (poorly lit; few/no streetlights)"
    points += scene.pedestrian
    points += sum(v.kind != "parked" for v in scene.vehicles) >= 2
    return min(4, 1 + points)


def _road_conditions(scene: Scene) -> str:
    if scene.weather == "Heavy rain":
        return "Wet asphalt with standing water"
    if scene.weather == "Light rain":
        return "Wet asphalt"
    if scene.weather == "Light snow":
        return "Damp asphalt with snow on the sides of the road"
    return "Dry asphalt"


def _safety_analysis(scene: Scene) -> str:
    road_name = scene.road.road_type.split(" - ")[0].lower()
    sentences = [f"The ego vehicle drives straight along a {road_name} {_WEATHER_WORDS[scene.weather]}, "
                 f"{_LIGHT_WORDS[scene.lighting]}."]
    if scene.weather in ("Heavy rain", "Dense fog"):
        sentences.append("Visibility is reduced" + (" and the road is wet." if scene.weather == "Heavy rain" else "."))
    kinds = [v.kind for v in scene.vehicles]
    if "lead" in kinds:
        sentences.append("It follows a car ahead in its lane, keeping a steady gap.")
    if "adjacent" in kinds:
        sentences.append("Another car drives alongside in the next lane.")
    if "oncoming" in kinds:
        sentences.append("An oncoming car passes in the opposite lane.")
    if "parked" in kinds:
        sentences.append("A car is parked at the right kerb.")
    if scene.pedestrian:
        side = "left" if scene.pedestrian_from_left else "right"
        where = "on the zebra crossing" if scene.crosswalk else "away from any crossing"
        sentences.append(f"A pedestrian crosses the road from the {side} {where}, and the ego vehicle "
                         "slows down and stops to let them pass.")
    if scene.light == "red":
        sentences.append("The signal ahead is red and the ego vehicle stops at the line.")
    elif scene.light == "yellow":
        sentences.append("The signal ahead is yellow and the ego vehicle slows down.")
    elif scene.light == "green":
        sentences.append("The signal ahead is green and the ego vehicle continues without slowing.")
    if len(sentences) == 1:
        sentences.append("Nothing requires the ego vehicle to react.")
    return " ".join(sentences)


def scene_label(scene: Scene) -> dict:
    """The label of a scene, normalised by the schema (so it is valid by construction)."""
    actions = (["Yield to VRUs"] if scene.pedestrian else []) + (["Vehicle following"] if scene.lead else [])
    signs = {
        "none": "No traffic signs are visible.",
        "speed_limit": "A round speed limit sign on the right side of the road.",
        "crossing": "A pedestrian crossing sign on the right side of the road.",
    }
    level = difficulty(scene)
    jaywalking = scene.pedestrian and not scene.crosswalk
    label = {
        "weather": scene.weather,
        "lighting": scene.lighting,
        "road_conditions": _road_conditions(scene),
        "traffic_light": _LIGHT_TEXT[scene.light],
        "traffic_sign": signs[scene.sign],
        "additional_traffic_rules": "A pedestrian crossing is marked ahead." if scene.crosswalk else None,
        "road_type": scene.road.road_type,
        "junction_type": "Four-way intersection with traffic signals" if scene.light != "none"
        else ("Straight segment with a pedestrian crossing" if scene.crosswalk else "Straight segment without junctions"),
        "lane_type": scene.road.lane_type,
        "additional_map_rules": "Zebra crossing markings on the road ahead." if scene.crosswalk else None,
        "interactive_expanded_metaaction": actions or None,
        "safety_analysis": _safety_analysis(scene),
        "driving_difficulty": level,
        "rule_violation": "True" if jaywalking else "False",
        "interesting_scenario": "True" if (level >= 3 or jaywalking) else "False",
    }
    return normalize_label(label)


def scene_labels(count: int, seed: int = 0) -> list[dict]:
    """Labels of the first `count` clips of `seed`, without drawing anything."""
    return [scene_label(sample_scene(seed, i)) for i in range(count)]


# ----------------------------------------------------------------------------- rendering

_SKY = {  # (top, horizon) RGB in daylight
    "Clear skies": ((0.22, 0.45, 0.88), (0.62, 0.78, 0.97)),
    "Partly cloudy": ((0.30, 0.52, 0.88), (0.68, 0.80, 0.95)),
    "Overcast": ((0.60, 0.62, 0.65), (0.74, 0.75, 0.77)),
    "Light rain": ((0.46, 0.48, 0.52), (0.60, 0.61, 0.64)),
    "Heavy rain": ((0.26, 0.28, 0.32), (0.40, 0.42, 0.45)),
    "Light snow": ((0.80, 0.82, 0.86), (0.90, 0.91, 0.93)),
    "Dense fog": ((0.80, 0.80, 0.80), (0.82, 0.82, 0.82)),
}
_LAMP_COLOURS = {"red": (1.0, 0.12, 0.08), "yellow": (1.0, 0.78, 0.05), "green": (0.1, 1.0, 0.45)}
_LAMP_SLOT = {"red": 0, "yellow": 1, "green": 2}
CAMERA_HEIGHT = 1.4  # metres
LANE_WIDTH = 3.5


class _Camera:
    """A pinhole camera at the ego vehicle, looking down the road."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.focal = 0.625 * width  # stylised: narrower than the 120 degrees of the file name, so objects read
        self.cx = width / 2.0
        self.horizon = 0.42 * height

    def project(self, lateral: float, up: float, distance: float) -> tuple[float, float]:
        """Screen (x, y) of a world point `lateral` m right, `up` m above the road, `distance` m ahead."""
        return (self.cx + self.focal * lateral / distance,
                self.horizon + self.focal * (CAMERA_HEIGHT - up) / distance)

    def scale(self, metres: float, distance: float) -> float:
        return self.focal * metres / distance


def _ego_travel(scene: Scene, times: np.ndarray, duration: float) -> np.ndarray:
    """Distance the ego vehicle has driven at each time: cruise, or brake to a stop, or slow."""
    v0 = scene.road.speed
    if scene.stops:
        stop_at = 0.8 * duration  # decelerate uniformly to a halt, then stand
        t = np.minimum(times, stop_at)
        return v0 * (t - t**2 / (2 * stop_at))
    if scene.light == "yellow":
        return v0 * (times - 0.25 * times**2 / duration)  # down to half speed by the end
    return v0 * times


def _box(img, cx, cy, radius, pad):
    """Pixel bounds (x0, x1, y0, y1) of a circle's square clipped to the image, or None when off screen."""
    h, w = img.shape[:2]
    x0, x1 = max(0, int(cx - radius)), min(w, int(cx + radius) + pad)
    y0, y1 = max(0, int(cy - radius)), min(h, int(cy + radius) + pad)
    return None if x0 >= x1 or y0 >= y1 else (x0, x1, y0, y1)


def _fill_disc(img, depth, cx, cy, radius, colour, z=None):
    box = _box(img, cx, cy, radius, pad=2)
    if box is None:
        return
    x0, x1, y0, y1 = box
    yy, xx = np.ogrid[y0:y1, x0:x1]
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    img[y0:y1, x0:x1][mask] = colour
    if z is not None:
        depth[y0:y1, x0:x1][mask] = z


def _fill_rect(img, depth, x0, y0, x1, y1, colour, z=None):
    h, w = img.shape[:2]
    xa, xb = max(0, round(x0)), min(w, round(x1))
    ya, yb = max(0, round(y0)), min(h, round(y1))
    if xa >= xb or ya >= yb:
        return
    img[ya:yb, xa:xb] = colour
    if z is not None:
        depth[ya:yb, xa:xb] = z


def _glow(img, cx, cy, radius, colour, strength):
    """Additive soft halo around a light source."""
    box = _box(img, cx, cy, radius, pad=1)
    if box is None:
        return
    x0, x1, y0, y1 = box
    yy, xx = np.ogrid[y0:y1, x0:x1]
    falloff = np.clip(1 - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius, 0, 1) ** 2
    img[y0:y1, x0:x1] += falloff[..., None] * np.asarray(colour) * strength


class _Renderer:
    def __init__(self, scene: Scene, width: int, height: int, fps: float, seconds: float):
        self.scene = scene
        self.cam = _Camera(width, height)
        self.count = max(1, round(seconds * fps))
        duration = self.count / fps
        times = np.arange(self.count) / fps
        self.travel = _ego_travel(scene, times, duration)
        self.times, self.duration = times, duration
        self.rng = np.random.default_rng(scene.noise_seed)
        # where the junction (stop line) is: close enough at the end that the scene reads
        lead = next((v for v in scene.vehicles if v.kind == "lead"), None)
        if scene.pedestrian:
            end_gap = 3.5  # the pedestrian walks 2.5 m beyond the line: about 6 m ahead, large on screen
        elif lead and scene.stops:
            end_gap = lead.distance + 5.0  # the lead car waits at the line, the ego vehicle behind it
        else:
            end_gap = 4.0 if scene.stops else 7.0
        self.stop_line = self.travel[-1] + end_gap
        self.sky = self._sky()
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.cols = np.arange(width, dtype=np.float32)[None, :]
        self.flakes = self.rng.uniform(0, 1, (160, 2)) * (height, width)
        self.lamp_spacing = 22.0

    # -- static parts
    def _sky(self) -> np.ndarray:
        cam, scene = self.cam, self.scene
        h, w = cam.height, cam.width
        top, bottom = (np.asarray(c, np.float32) for c in _SKY[scene.weather])
        frac = np.clip(np.arange(h, dtype=np.float32) / max(cam.horizon, 1), 0, 1)[:, None, None]
        sky = np.broadcast_to(top * (1 - frac) + bottom * frac, (h, w, 3)).copy()
        if scene.weather == "Partly cloudy":
            for _ in range(5):
                cx, cy = self.rng.uniform(0, w), self.rng.uniform(0.05, 0.3) * h
                rx, ry = self.rng.uniform(0.12, 0.22) * w, self.rng.uniform(0.06, 0.1) * h
                yy, xx = np.ogrid[0:h, 0:w]
                d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
                cloud = np.clip(1.3 - d, 0, 1)[..., None]
                sky = sky * (1 - cloud) + np.float32(0.96) * cloud
        elif scene.weather in ("Overcast", "Light rain", "Heavy rain"):
            bands = 0.03 * np.sin(np.arange(h)[:, None] / 3.0 + np.arange(w)[None, :] / 17.0)
            sky += bands[..., None].astype(np.float32)
        if scene.night:
            # night sky: dark, but weather still shows (clouds lit from below, fog glows)
            sky = sky * (0.28 if scene.lighting.startswith("Night (well") else 0.2)
        return sky.astype(np.float32)

    # -- per frame
    def frame(self, i: int) -> np.ndarray:
        cam, scene = self.cam, self.scene
        h, w = cam.height, cam.width
        s = self.travel[i]
        img = self.sky.copy()
        depth = np.full((h, w), 1e3, np.float32)
        self._ground(img, depth, s)
        if scene.road.roadside == "sidewalk" or scene.lighting.startswith("Night (well"):
            self._poles(img, depth, s)
        self._sign(img, depth, s)
        for vehicle in sorted(scene.vehicles, key=lambda v: -self._vehicle_distance(v, i)):
            self._vehicle(img, depth, vehicle, i)
        if scene.pedestrian:
            self._pedestrian(img, depth, i, s)
        if scene.light != "none":
            self._signal_housing(img, depth, s)
        img = self._light(img, depth)
        img = self._fog(img, depth)
        self._emissive(img, i, s)
        self._precipitation(img, i)
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    @functools.cached_property
    def _ground_layers(self) -> dict:
        """What the ground of every frame shares, drawn once: the surface, the solid lines, and the masks of the
        dashed lines and of what is drawn over the dashes. `_ground` then draws each frame in the same order (the
        pixels are the same as drawing it all per frame, at a fraction of the time)."""
        cam, scene, road = self.cam, self.scene, self.scene.road
        top = int(math.floor(cam.horizon)) + 1
        rows = self.rows[top:]
        z = cam.focal * CAMERA_HEIGHT / (rows - cam.horizon)  # distance of each ground row
        x = (self.cols - cam.cx) * z / cam.focal  # lateral metres of each pixel
        zz = np.broadcast_to(z, x.shape)
        near = 0.8 * z / cam.focal  # metres that 0.8 px covers in each row: lines stay visible far away

        def half(metres):
            return np.maximum(metres / 2, near)

        right_edge = LANE_WIDTH / 2
        ego_left = right_edge - road.lanes_per_direction * LANE_WIDTH
        left_edge = ego_left - (road.lanes_per_direction * LANE_WIDTH if road.oncoming else 0.6)
        snowy = scene.weather == "Light snow"
        asphalt = {"Heavy rain": 0.2, "Light rain": 0.27}.get(scene.weather, 0.36)
        ground = np.empty(x.shape + (3,), np.float32)
        side = (0.85, 0.86, 0.9) if snowy else ((0.55, 0.55, 0.53) if road.roadside == "sidewalk" else (0.25, 0.45, 0.18))
        ground[:] = side
        on_road = (x > left_edge) & (x < right_edge)
        ground[on_road] = (asphalt, asphalt, asphalt * 1.04)
        if scene.weather in ("Heavy rain", "Light rain"):  # wet sheen: brighter patches further away
            sheen = (0.12 if scene.weather == "Heavy rain" else 0.06) * np.clip(1 - z / 40, 0, 1) * np.abs(np.sin(x * 1.3))
            ground[on_road] += np.broadcast_to(sheen, x.shape)[on_road][:, None]
        if snowy:
            ground[on_road & ((x < left_edge + 0.6) | (x > right_edge - 0.5))] = (0.8, 0.82, 0.86)
        for edge in (left_edge + 0.15, right_edge - 0.15):
            ground[np.abs(x - edge) < half(0.15)] = _WHITE

        dashed = []
        for k in range(1, road.lanes_per_direction):
            dashed.append(np.abs(x - (right_edge - k * LANE_WIDTH)) < half(0.14))
            if road.oncoming:
                dashed.append(np.abs(x - (ego_left - k * LANE_WIDTH)) < half(0.14))
        painted = []  # (mask, colour): the solid centre lines or the barrier, drawn over the dashes
        if road.centre_line == "dashed_white":
            dashed.append(np.abs(x - ego_left) < half(0.14))
        elif road.centre_line == "solid_yellow":
            painted.append((np.abs(x - ego_left) < half(0.15), _YELLOW))
        elif road.centre_line == "double_yellow":
            painted.append((np.abs(x - ego_left - 0.15) < half(0.12), _YELLOW))
            painted.append((np.abs(x - ego_left + 0.15) < half(0.12), _YELLOW))
        else:  # concrete barrier along the left
            painted.append(((x > ego_left - 0.6) & (x < ego_left), (0.7, 0.7, 0.68)))
        return dict(top=top, x=x, zz=zz, on_road=on_road, ego_left=ego_left, surface=ground, dashed=dashed,
                    painted=painted)

    def _ground(self, img, depth, s):
        layers = self._ground_layers
        x, zz, on_road = layers["x"], layers["zz"], layers["on_road"]
        ground = layers["surface"].copy()
        if layers["dashed"]:
            world = zz + s  # distance along the road, so markings stream past as the car moves
            dashes = (world % 9.0) < 3.5
            for line in layers["dashed"]:
                ground[line & dashes] = _WHITE
        for mask, colour in layers["painted"]:
            ground[mask] = colour
        if self.scene.junction:
            line = self.stop_line - s
            ground[on_road & (zz > line) & (zz < line + 0.5) & (x > layers["ego_left"])] = _WHITE  # stop line, ego side
            if self.scene.crosswalk:
                zebra = on_road & (zz > line + 1.0) & (zz < line + 4.0) & ((x % 1.2) < 0.6)
                ground[zebra] = (0.95, 0.95, 0.93)
        img[layers["top"]:] = ground
        depth[layers["top"]:] = zz

    def _poles(self, img, depth, s):
        """Street lamp poles along the right side; at night their heads light up (see `_emissive`)."""
        cam = self.cam
        for z in self._lamp_distances(s):
            x0, y_top = cam.project(LANE_WIDTH / 2 + 1.2, 6.0, z)
            _, y_bottom = cam.project(0, 0, z)
            width = max(1.0, cam.scale(0.2, z))
            _fill_rect(img, depth, x0 - width / 2, y_top, x0 + width / 2, y_bottom, (0.3, 0.3, 0.32), z)
            arm = cam.scale(1.2, z)
            _fill_rect(img, depth, x0 - arm, y_top, x0, y_top + max(1.0, cam.scale(0.15, z)), (0.3, 0.3, 0.32), z)

    def _lamp_distances(self, s):
        first = self.lamp_spacing - (s % self.lamp_spacing)
        return [d for d in np.arange(first, 90.0, self.lamp_spacing)[::-1] if d > 3.0]

    def _sign(self, img, depth, s):
        if self.scene.sign == "none":
            return
        cam = self.cam
        z = self.stop_line - s - 1.5 if self.scene.sign == "crossing" else 0.55 * self.travel[-1] + 12.0 - s
        if not 2.5 < z < 80:
            return
        x, y = cam.project(LANE_WIDTH / 2 + 2.0, 2.2, z)
        _, y_ground = cam.project(0, 0, z)
        r = max(2.0, cam.scale(0.55, z))
        _fill_rect(img, depth, x - max(1.0, r / 6), y, x + max(1.0, r / 6), y_ground, (0.4, 0.4, 0.42), z)
        if self.scene.sign == "speed_limit":
            _fill_disc(img, depth, x, y, r, (0.85, 0.1, 0.1), z)
            _fill_disc(img, depth, x, y, r * 0.72, (0.97, 0.97, 0.97), z)
            _fill_rect(img, depth, x - r * 0.35, y - r * 0.3, x + r * 0.35, y + r * 0.3, (0.1, 0.1, 0.1), z)
        else:
            _fill_rect(img, depth, x - r, y - r, x + r, y + r, (0.1, 0.35, 0.85), z)
            _fill_disc(img, depth, x, y, r * 0.55, (0.97, 0.97, 0.97), z)

    def _vehicle_distance(self, vehicle: Vehicle, i: int) -> float:
        t = self.times[i]
        if vehicle.kind == "lead":
            return vehicle.distance + 0.4 * math.sin(t)  # keeps its gap, breathing a little
        if vehicle.kind == "adjacent":
            return vehicle.distance + vehicle.speed * t
        if vehicle.kind == "oncoming":
            return vehicle.distance - vehicle.speed * t
        return vehicle.distance - self.travel[i]  # parked: only the ego vehicle moves

    def _vehicle(self, img, depth, vehicle: Vehicle, i: int):
        z = self._vehicle_distance(vehicle, i)
        if not 2.5 < z < 120:
            return
        cam = self.cam
        x_centre, y_bottom = cam.project(vehicle.lateral, 0.0, z)
        half_w, height = cam.scale(1.0, z), cam.scale(1.6, z)
        x0, x1, y0 = x_centre - half_w, x_centre + half_w, y_bottom - height
        if self.scene.lighting == "Daytime (direct sunlight)":  # hard shadow on the road
            _fill_rect(img, depth, x0 - half_w * 0.1, y_bottom - height * 0.08, x1 + half_w * 0.3, y_bottom + height * 0.12,
                       (0.08, 0.08, 0.1), None)
        colour = np.asarray(vehicle.colour, np.float32)
        _fill_rect(img, depth, x0, y0 + height * 0.35, x1, y_bottom - height * 0.12, colour, z)  # body
        _fill_rect(img, depth, x0 + half_w * 0.2, y0, x1 - half_w * 0.2, y0 + height * 0.38, colour * 0.8, z)  # cabin
        _fill_rect(img, depth, x0 + half_w * 0.3, y0 + height * 0.06, x1 - half_w * 0.3, y0 + height * 0.33,
                   (0.12, 0.14, 0.18), z)  # window
        for wheel_x in (x0 + half_w * 0.15, x1 - half_w * 0.45):
            _fill_rect(img, depth, wheel_x, y_bottom - height * 0.14, wheel_x + half_w * 0.3, y_bottom, (0.05, 0.05, 0.05), z)

    def _pedestrian(self, img, depth, i, s):
        cam, scene = self.cam, self.scene
        z = self.stop_line - s + 2.5
        left, right = -3.0, LANE_WIDTH / 2 + 0.8  # the stretch in view: across the ego lane and the next one
        progress = self.times[i] / self.duration
        lateral = left + (right - left) * progress if scene.pedestrian_from_left else right - (right - left) * progress
        x, y_feet = cam.project(lateral, 0.0, z)
        height, width = cam.scale(1.75, z), cam.scale(0.8, z)
        clothes = np.asarray(scene.pedestrian_colour, np.float32)
        step = math.sin(self.times[i] * 8.0) * width * 0.25
        _fill_rect(img, depth, x - width / 2 + step, y_feet - height * 0.45, x - width * 0.1 + step, y_feet, (0.15, 0.15, 0.25), z)
        _fill_rect(img, depth, x + width * 0.1 - step, y_feet - height * 0.45, x + width / 2 - step, y_feet, (0.15, 0.15, 0.25), z)
        _fill_rect(img, depth, x - width / 2, y_feet - height * 0.82, x + width / 2, y_feet - height * 0.42, clothes, z)
        _fill_disc(img, depth, x, y_feet - height * 0.9, height * 0.1, (0.85, 0.68, 0.55), z)

    def _signal_layout(self, s):
        """Screen position of the overhead signal: three lamps in a row, large enough to survive downscaling."""
        cam = self.cam
        closeness = np.clip(1 - (self.stop_line - s) / 60.0, 0, 1)
        lamp = cam.height * (0.25 + 0.06 * closeness)  # diameter; >= 20 px at 84 px of height
        gap = 0.12 * lamp
        width = 3 * lamp + 4 * gap
        x0 = cam.width * 0.62 - width / 2
        y0 = cam.height * 0.03
        centres = [(x0 + gap + lamp / 2 + k * (lamp + gap), y0 + gap + lamp / 2) for k in range(3)]
        return x0, y0, width, lamp + 2 * gap, lamp, centres

    def _signal_housing(self, img, depth, s):
        x0, y0, width, height, lamp, centres = self._signal_layout(s)
        z = self.stop_line - s + 4.0  # over the far side of the crossing
        dim = 0.3 if self.scene.night else 1.0  # drawn in the sky, which `_light` leaves alone
        _fill_rect(img, depth, 0, y0 + height * 0.35, x0, y0 + height * 0.6, (0.2 * dim,) * 3, z)  # gantry arm
        _fill_rect(img, depth, x0, y0, x0 + width, y0 + height, (0.1 * dim,) * 3, z)
        for cx, cy in centres:
            _fill_disc(img, depth, cx, cy, lamp / 2, (0.22 * dim, 0.22 * dim, 0.2 * dim), z)

    def _light(self, img, depth):
        lighting = self.scene.lighting
        if lighting == "Daytime (direct sunlight)":
            img = 0.5 + (img - 0.5) * 1.25
            img *= np.asarray((1.08, 1.02, 0.9), np.float32)
        elif lighting == "Daytime (diffused light)":
            img *= np.asarray((0.96, 0.98, 1.02), np.float32)
        elif lighting == "Daytime (low-contrast daylight)":
            img = 0.58 + (img - 0.58) * 0.4
        else:
            gain, tint = self._night_light
            img = img * gain * tint
        return img.astype(np.float32)

    @functools.cached_property
    def _night_light(self) -> tuple[np.ndarray, np.ndarray]:
        """The night's light on the ground, the same in every frame: (gain, tint) for each pixel."""
        cam, lighting = self.cam, self.scene.lighting
        x = (self.cols - cam.cx) / cam.width
        y = (self.rows - cam.horizon) / max(cam.height - cam.horizon, 1)
        headlights = np.clip(1 - (x / (0.15 + 0.35 * np.clip(y, 0, 1))) ** 2, 0, 1) * np.clip(y, 0, 1) ** 0.7
        if lighting.startswith("Night (well"):
            # warm lamp light on everything near the road, brighter than headlights alone
            gain = 0.38 + 0.5 * headlights
            tint = np.asarray((1.25, 1.0, 0.62), np.float32)
        else:
            gain = 0.1 + 0.75 * headlights
            tint = np.asarray((0.85, 0.92, 1.15), np.float32)
        below = (self.rows > cam.horizon).astype(np.float32)
        gain = gain * below + (1 - below)  # the sky was darkened already
        return gain[..., None], np.where(below[..., None] > 0, tint, 1.0)

    def _fog(self, img, depth):
        scene = self.scene
        reach = {"Dense fog": 9.0, "Heavy rain": 60.0, "Light snow": 90.0, "Light rain": 150.0}.get(scene.weather)
        if reach is None:
            return img
        density = 1 - np.exp(-depth / reach)
        colour = np.asarray(_SKY[scene.weather][1], np.float32)
        if scene.night:
            colour = colour * (0.35 if scene.lighting.startswith("Night (well") else 0.18)
            if scene.lighting.startswith("Night (well"):
                colour = colour * np.asarray((1.2, 1.0, 0.7), np.float32)
        return img * (1 - density[..., None]) + colour * density[..., None]

    def _emissive(self, img, i, s):
        cam, scene = self.cam, self.scene
        fogged = scene.weather == "Dense fog"
        if scene.lighting == "Daytime (direct sunlight)":
            _fill_disc(img, None, cam.width * 0.15, cam.height * 0.1, cam.height * 0.07, (1.0, 0.98, 0.85))
            _glow(img, cam.width * 0.15, cam.height * 0.1, cam.height * 0.25, (0.5, 0.45, 0.3), 0.6)
        if scene.lighting.startswith("Night (well"):
            for z in self._lamp_distances(s):
                x0, y_top = cam.project(LANE_WIDTH / 2, 6.0, z)  # the lamp at the end of the pole's arm
                r = max(1.5, cam.scale(0.35, z))
                _fill_disc(img, None, x0, y_top, r, (1.0, 0.9, 0.6))
                _glow(img, x0, y_top, r * 4, (1.0, 0.75, 0.35), 0.5 if not fogged else 0.8)
        if scene.night:
            for vehicle in scene.vehicles:
                z = self._vehicle_distance(vehicle, i)
                if vehicle.kind == "parked" or not 2.5 < z < 120:
                    continue
                x_centre, y_bottom = cam.project(vehicle.lateral, 0.0, z)
                half_w, height = cam.scale(1.0, z), cam.scale(1.6, z)
                colour = (1.0, 0.95, 0.8) if vehicle.kind == "oncoming" else (1.0, 0.08, 0.05)  # head / tail lights
                for lx in (x_centre - half_w * 0.75, x_centre + half_w * 0.75):
                    ly = y_bottom - height * 0.3
                    _fill_disc(img, None, lx, ly, max(1.0, half_w * 0.14), colour)
                    _glow(img, lx, ly, max(3.0, half_w * 0.5), colour, 0.5)
        if scene.light != "none":
            *_, lamp, centres = self._signal_layout(s)
            cx, cy = centres[_LAMP_SLOT[scene.light]]
            colour = _LAMP_COLOURS[scene.light]
            _fill_disc(img, None, cx, cy, lamp / 2, colour)
            _glow(img, cx, cy, lamp * 1.1, colour, 0.35)
            if fogged:  # fog softens the signal but must not hide its colour
                _glow(img, cx, cy, lamp * 1.6, (0.6, 0.6, 0.6), 0.15)

    def _precipitation(self, img, i):
        cam, scene = self.cam, self.scene
        h, w = cam.height, cam.width
        rng = np.random.default_rng([scene.noise_seed, i])
        bright = 0.45 if scene.night else 1.0
        if scene.weather in ("Light rain", "Heavy rain"):
            count, length = (70, 0.07 * h) if scene.weather == "Light rain" else (320, 0.11 * h)
            starts = rng.uniform(0, 1, (count, 2)) * (h, w)
            steps = np.arange(int(length))
            ys = (starts[:, :1] + steps).astype(int)
            xs = (starts[:, 1:] + steps * 0.25).astype(int)
            keep = (ys < h) & (xs < w)
            ys, xs = ys[keep], xs[keep]
            img[ys, xs] = img[ys, xs] * 0.45 + np.float32(0.55 * 0.85 * bright)
        elif scene.weather == "Light snow":
            pos = (self.flakes + np.asarray([1.6, 0.4]) * i * (h / 144)) % (h, w)
            size = max(1, round(h / 72))
            for dy in range(size + 1):
                for dx in range(size + 1):
                    ys = np.clip(pos[:, 0].astype(int) + dy, 0, h - 1)
                    xs = np.clip(pos[:, 1].astype(int) + dx, 0, w - 1)
                    img[ys, xs] = 0.95 * bright


def render_frames(scene: Scene, width: int = 256, height: int = 144, fps: float = 10, seconds: float = 5.0):
    """All frames of a scene, (T, H, W, 3) uint8 RGB."""
    renderer = _Renderer(scene, width, height, fps, seconds)
    return np.stack([renderer.frame(i) for i in range(renderer.count)])


def _encode(frames: np.ndarray, path: Path, fps: float) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # one thread and fixed settings: the same frames give the same bytes on every run
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "20", "preset": "veryfast", "g": str(round(fps) * 2)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@dataclass(frozen=True)
class _Job:
    index: int
    seed: int
    out_dir: str
    width: int
    height: int
    fps: float
    seconds: float


def _write_clip(job: _Job) -> str:
    """Render, encode and label one clip; skip it when both files exist (resume)."""
    out = Path(job.out_dir)
    name = clip_id(job.seed, job.index)
    video = out / "videos" / f"{name}{VIDEO_SUFFIX}"
    meta = out / "metas" / f"{name}{LABEL_SUFFIX}"
    if video.exists() and meta.exists():
        return name
    scene = sample_scene(job.seed, job.index)
    frames = render_frames(scene, job.width, job.height, job.fps, job.seconds)
    partial = video.with_name(video.name + ".part")
    _encode(frames, partial, job.fps)
    partial.replace(video)  # a half-written clip never looks finished
    meta.write_text(label_to_json(scene_label(scene), indent=4) + "\n", encoding="utf-8")
    return name


def generate(out_dir: str | Path, num_clips: int = 100, seed: int = 0, width: int = 256, height: int = 144,
             seconds: float = 5.0, fps: float = 10.0, workers: int = 0, progress: bool = True) -> list[str]:
    """Write `num_clips` clips and labels in the recipe layout; returns their ids in order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p H.264, got {width}x{height}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "metas").mkdir(parents=True, exist_ok=True)
    jobs = [_Job(i, seed, str(out), width, height, fps, seconds) for i in range(num_clips)]
    workers = workers or min(os.cpu_count() or 1, max(1, num_clips))
    bar = dict(total=num_clips, desc="synthetic clips", unit="clip", disable=not progress)
    if workers == 1:
        return [name for name in tqdm(map(_write_clip, jobs), **bar)]
    # spawn, not fork: callers (tests, the demo) may already run torch threads, which fork can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(_write_clip, jobs, chunksize=4), **bar))


# ----------------------------------------------------------------------------- CLI


@dataclass
class SynthArguments:
    output_dir: str = field(default="data/synthetic_raw", metadata={"help": "Folder to write videos/ and metas/ into."})
    num_clips: int = field(default=100, metadata={"help": "Number of clips."})
    seed: int = field(default=0, metadata={"help": "Seed: clip i of a seed is always the same clip."})
    width: int = field(default=256, metadata={"help": "Frame width in pixels (even)."})
    height: int = field(default=144, metadata={"help": "Frame height in pixels (even)."})
    seconds: float = field(default=5.0, metadata={"help": "Clip length in seconds."})
    fps: float = field(default=10.0, metadata={"help": "Frames per second of the written clips."})
    workers: int = field(default=0, metadata={"help": "Processes to render with; 0 uses every core."})


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser("synth", dataclass_types=[SynthArguments])
    return ArgumentParser(dataclass_types=[SynthArguments], prog="avlabel synth")


def main(args: SynthArguments) -> None:
    names = generate(args.output_dir, args.num_clips, args.seed, args.width, args.height, args.seconds, args.fps,
                     args.workers)
    print(f"wrote {len(names)} clips to {Path(args.output_dir) / 'videos'} and their labels to {Path(args.output_dir) / 'metas'}")


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("synth")
